"""Logits of megatron-core GPTModel (CPU emulation, gloo) loaded from sfmed conversions equal
the reference forward of every family: transformers' class where it exists, the reference
forward in ``reference.py`` otherwise. One torchrun launch serves every family and layout:

- each family's tiny model converted at TP=2×PP=2 and loaded at TP=2×PP=2;
- a GQA model with 2 KV heads converted and loaded at TP=4 (TP > KV heads);
- the same model converted at TP=1 and loaded at TP=4 (reshard on load).
"""

from __future__ import annotations

import json
from pathlib import Path

import family_cases
import pytest
import torch
from family_cases import FAMILY_CASES

from sfmed.convert import convert_hf_to_mcore
from sfmed.convert.verify import make_tokens

HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.dist, pytest.mark.slow]

family_factory = family_cases.family_factory  # the session fixture


def _cases(factory):
    """(name, HF folder, reference logits function, [(convert tp, pp, load tp, pp)])."""

    out = []
    for name, case in FAMILY_CASES.items():
        hf = factory(name)
        out.append((name, hf, case["reference"], case.get("layouts", [(2, 2, 2, 2)])))
    return out


def test_logits_equal_reference_for_every_family(torchrun, tmp_path, family_factory):
    jobs, expected = [], {}
    for name, hf, reference, layouts in _cases(family_factory):
        from sfmed.models import arch_from_hf_config

        arch = arch_from_hf_config(hf)
        tokens = make_tokens(arch.vocab_size, 2, 16, seed=1)
        tok_path = tmp_path / f"{name}_tokens.pt"
        torch.save(tokens, tok_path)
        expected[name] = reference(hf, tokens)
        for ctp, cpp, ltp, lpp in layouts:
            ck = tmp_path / f"{name}_mc_{ctp}_{cpp}"
            if not ck.exists():
                convert_hf_to_mcore(hf, ck, tp=ctp, pp=cpp, progress=False)
            out = tmp_path / f"{name}_{ctp}{cpp}_{ltp}{lpp}.pt"
            jobs.append(
                dict(name=name, ckpt=str(ck), tokens=str(tok_path), out=str(out), tp=ltp, pp=lpp)
            )
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    torchrun(HERE / "worker_family_logits.py", spec, nproc=4, timeout=900)
    for job in jobs:
        ref = expected[job["name"]]
        got = torch.load(job["out"], weights_only=True)
        assert got.shape == ref.shape, job
        diff = (got - ref).abs().max().item()
        assert diff <= 1e-4, (job, diff)
        assert torch.equal(got.argmax(-1), ref.argmax(-1)), job
