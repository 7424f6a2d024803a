"""A checkpoint written before model families existed (tests/fixtures/convert_v0, made by the
converter of commit 5eea1ea) still reads, converts back bit-exactly, and equals what today's
converter writes for the same model. Its load into megatron-core at TP=2 x PP=2 is checked in
test_convert_megatron.py (shared torchrun launch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sfmed.convert import checkpoint_arch, convert_hf_to_mcore, convert_mcore_to_hf
from sfmed.core.torch_dist import TorchDistReader
from sfmed.models import ModelArch, arch_from_dict

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "convert_v0"


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118
                out[k] = h.get_tensor(k)
    return out


@pytest.fixture
def old_ckpt(tmp_path) -> Path:
    """A private copy (conversion must not write next to the committed files)."""
    dst = tmp_path / "mcore"
    shutil.copytree(FIXTURE / "mcore", dst)
    return dst


def test_old_metadata_reads_as_qwen2(old_ckpt):
    meta = json.loads((old_ckpt / "release" / "sfmed.json").read_text())
    assert "family" not in meta["arch"] and "qkv_bias" not in meta["arch"]  # the old layout
    arch, padded = checkpoint_arch(old_ckpt)
    assert padded == 128
    assert arch == ModelArch(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=100,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        kv_channels=8,
        torch_dtype="bfloat16",
        family="qwen2",
        qkv_bias=True,
        linear_bias=False,
        qk_layernorm=False,
    )


def test_unknown_family_in_metadata_is_refused():
    from sfmed.core.errors import ConfigError

    meta = json.loads((FIXTURE / "mcore" / "release" / "sfmed.json").read_text())
    with pytest.raises(ConfigError, match=r"model_type='gpt9' is not supported; sfmed converts"):
        arch_from_dict({**meta["arch"], "family": "gpt9"})


def test_old_checkpoint_converts_back_bit_exactly(old_ckpt, tmp_path):
    out = tmp_path / "back"
    convert_mcore_to_hf(old_ckpt, out, progress=False)
    want, got = _hf_tensors(FIXTURE / "hf"), _hf_tensors(out)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype == torch.bfloat16, k
        assert torch.equal(got[k], want[k]), k
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (FIXTURE / "hf" / "config.json").read_text()
    )


def test_new_converter_writes_the_old_layout(old_ckpt, tmp_path):
    """Same model, same options: every tensor, chunk grid and _extra_state object is the same."""
    new = tmp_path / "new"
    convert_hf_to_mcore(FIXTURE / "hf", new, tp=2, make_vocab_size_divisible_by=16, progress=False)
    a, b = TorchDistReader(old_ckpt / "release"), TorchDistReader(new / "release")
    assert sorted(a.metadata.state_dict_metadata) == sorted(b.metadata.state_dict_metadata)
    for key in a.tensor_keys():
        assert a.shape(key) == b.shape(key) and a.dtype(key) == b.dtype(key), key
        assert sorted(a.chunks(key)) == sorted(b.chunks(key)), key
        full = (0,) * len(a.shape(key))
        assert torch.equal(a.read(key, full, a.shape(key)), b.read(key, full, b.shape(key))), key
    old_meta = json.loads((old_ckpt / "release" / "sfmed.json").read_text())
    new_meta = json.loads((new / "release" / "sfmed.json").read_text())
    assert {k: v for k, v in new_meta["arch"].items() if k in old_meta["arch"]} == old_meta["arch"]
    assert new_meta["arch"]["family"] == "qwen2"
