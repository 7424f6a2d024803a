"""Every family: HF -> Megatron (torch_dist) -> HF is bit-exact at TP in {1, 2, 4} (where
megatron-core can split the model) x PP in {1, 2}, through ``launch/convert.py``'s library
functions (single process, pure CPU), and the exported folder loads with the family's class."""

from __future__ import annotations

import family_cases
import pytest
import torch
from family_cases import FAMILY_CASES

from sfmed.convert import convert_hf_to_mcore, convert_mcore_to_hf
from sfmed.convert.quickstart import compare_hf_folders
from sfmed.convert.verify import make_tokens
from sfmed.core.parallel import valid_tp
from sfmed.models import arch_from_hf_config

family_factory = family_cases.family_factory  # the session fixture


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_round_trip_bit_exact(family_factory, tmp_path, case):
    hf = family_factory(case)
    arch = arch_from_hf_config(hf)
    tps = [t for t in (1, 2, 4) if t in valid_tp(arch)]
    assert 4 in tps  # every tiny case is meant to exercise TP=4
    for tp in tps:
        for pp in (1, 2):
            ck, back = tmp_path / f"mc{tp}{pp}", tmp_path / f"hf{tp}{pp}"
            convert_hf_to_mcore(hf, ck, tp=tp, pp=pp, progress=False)
            convert_mcore_to_hf(ck, back, progress=False)
            assert compare_hf_folders(hf, back) == [], (case, tp, pp)
            assert (back / "config.json").read_bytes() == (hf / "config.json").read_bytes()
    # what a user of the export does: the family's own class (or reference) reads it
    tokens = make_tokens(arch.vocab_size, 1, 8)
    ref = FAMILY_CASES[case]["reference"]
    assert torch.equal(ref(back, tokens), ref(hf, tokens))
