"""Vocabulary padding rows are zero in every converted checkpoint, at every TP conversion uses.

The rows past the real vocabulary exist only so the embedding and output layer split evenly
over TP ranks; non-zero rows would give made-up tokens probability mass (output layer) or
leak into tied weights. Checked for the embedding and the untied output layer at TP 1/2/4/8,
and with Megatron-LM's own padding rule (padding that depends on TP).
"""

from __future__ import annotations

import json

import pytest
import torch

from sfmed.convert import convert_hf_to_mcore
from sfmed.convert import keymap as km
from sfmed.core.torch_dist import TorchDistReader
from sfmed.models.families.qwen2 import HF_EMBED, HF_LM_HEAD


def _hf(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _full(r: TorchDistReader, key: str) -> torch.Tensor:
    shape = r.shape(key)
    return r.read(key, (0,) * len(shape), shape)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    "tp, divisible_by, pad_tp, padded",
    [
        (1, 128, 8, 1024),
        (2, 128, 8, 1024),
        (4, 128, 8, 1024),
        (8, 128, 8, 1024),
        # Megatron-LM's rule (pad for this TP only): multiple of 100 * tp
        (4, 100, 1, 1200),
        (8, 100, 1, 1600),
    ],
)
def test_padding_rows_are_zero(
    tiny_qwen2_factory, tmp_path, tied, tp, divisible_by, pad_tp, padded
):
    # 8 heads / 8 KV heads, ffn 128: splits 8 ways; vocab 1000 is no multiple of 128
    hf = tiny_qwen2_factory(tie_word_embeddings=tied, num_kv_heads=8)
    src = _hf(hf)
    ck = tmp_path / "ck"
    convert_hf_to_mcore(
        hf, ck, tp=tp, make_vocab_size_divisible_by=divisible_by, vocab_pad_tp=pad_tp,
        progress=False,
    )  # fmt: skip
    meta = json.loads((ck / "release" / "sfmed.json").read_text())
    assert meta["padded_vocab_size"] == padded
    r = TorchDistReader(ck / "release")
    tables = {km.EMBED: src[HF_EMBED]}
    if not tied:
        tables[km.OUTPUT] = src[HF_LM_HEAD]
    else:
        assert not r.has(km.OUTPUT)
    for key, ref in tables.items():
        w = _full(r, key)
        assert w.shape == (padded, 64), key
        assert torch.equal(w[:1000], ref), key
        assert w[1000:].abs().sum().item() == 0.0, (key, tp)
