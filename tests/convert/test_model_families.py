"""The model-family registry, the generic architecture/layer-spec path and the tensor mapping
kinds (each kind's to_mcore/to_hf, TP blocks and streaming plans agree with one another)."""

from __future__ import annotations

import json

import pytest
import torch

from sfmed.core.errors import ConfigError
from sfmed.models import (
    ModelArch,
    arch_from_hf_config,
    arch_to_dict,
    family_for,
    get_family,
    registered_families,
)
from sfmed.models import mapping as mp

ARCH = ModelArch(
    num_layers=2,
    hidden_size=32,
    ffn_hidden_size=48,
    num_attention_heads=8,
    num_query_groups=4,
    vocab_size=50,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=1e4,
    tie_word_embeddings=False,
    kv_channels=4,
)


def test_registry():
    assert "qwen2" in registered_families()
    fam = get_family("qwen2")
    assert family_for(ARCH) is fam and fam.model_type == ARCH.family == "qwen2"
    with pytest.raises(
        ConfigError, match=r"model_type='gpt2' is not supported; sfmed converts .*qwen2"
    ):
        get_family("gpt2")
    with pytest.raises(ConfigError, match=r"model_type=None"):
        arch_from_hf_config({"hidden_size": 8})


def test_qwen2_config_roundtrip_and_refusals():
    fam = get_family("qwen2")
    cfg = fam.hf_config_dict(ARCH, "float32")
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == [fam.hf_architecture]
    back = arch_from_hf_config(cfg)
    assert back == ModelArch(**{**arch_to_dict(ARCH), "torch_dtype": "float32"})
    # attention_bias=false describes a model without q/k/v biases: not a Qwen2 (its modeling code
    # always has them), so the Qwen2 family refuses it; the generic arch can still express it.
    with pytest.raises(ConfigError, match=r"Qwen2 has biases on q/k/v only"):
        arch_from_hf_config({**cfg, "attention_bias": False})
    with pytest.raises(ConfigError, match=r"hidden_act='gelu'"):
        arch_from_hf_config({**cfg, "hidden_act": "gelu"})


def test_generic_path_takes_spec_facts_from_the_arch(monkeypatch):
    """No family check in generic code: a bias-free, q/k-normed arch gets the matching
    TransformerConfig and layer spec (what a LLaMA/Qwen3 family will rely on)."""
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.identity_op import IdentityOp

    # Without parallel state (no process group in this test) every layer is on this "stage".
    monkeypatch.setattr(
        transformer_block, "get_num_layers_to_build", lambda config, vp_stage=None: 2
    )

    from sfmed.models import decoder_layer_spec, transformer_config
    from sfmed.models.norm import RMSNorm

    plain = transformer_config(ARCH)
    assert plain.add_qkv_bias and not plain.add_bias_linear and not plain.qk_layernorm
    other = ModelArch(**{**arch_to_dict(ARCH), "qkv_bias": False, "qk_layernorm": True})
    cfg = transformer_config(other)
    assert not cfg.add_qkv_bias and cfg.qk_layernorm
    spec = decoder_layer_spec(cfg)
    attn = spec.layer_specs[0].submodules.self_attention.submodules
    assert attn.q_layernorm is not IdentityOp and attn.k_layernorm is not IdentityOp
    assert len(spec.layer_specs) == 2 and spec.layer_norm is RMSNorm
    plain_attn = decoder_layer_spec(plain).layer_specs[0].submodules.self_attention.submodules
    assert plain_attn.q_layernorm is IdentityOp


def _kinds():
    table = get_family("qwen2").mapping(ARCH)
    return [*table.layer, table.pre[0], table.post[-1]]


@pytest.mark.parametrize("m", _kinds(), ids=lambda m: f"{type(m).__name__}:{m.mcore}")
def test_mapping_kind_is_consistent(m):
    padded = 64
    g = torch.Generator().manual_seed(0)
    hf = [torch.randn(s, generator=g) for s in m.hf_shapes(ARCH)]
    full = m.to_mcore(hf, ARCH)
    if isinstance(m, mp.Vocab):
        full = mp.padded_rows(full, 0, padded, ARCH.vocab_size)
    assert tuple(full.shape) == m.mcore_shape(ARCH, padded)
    if not isinstance(m, mp.Vocab):
        assert all(torch.equal(a, b) for a, b in zip(m.to_hf(full, ARCH), hf))

    class Source:  # the engine's HF reader, from memory
        def get(self, name):
            return hf[list(m.hf_names(0)).index(name)]

        def get_rows(self, name, start, stop):
            return self.get(name)[start:stop]

    for tp in (1, 2, 4):
        stored = list(m.mcore_blocks(Source(), ARCH, tp, padded, torch.float32, 0))
        regions = [r for rank in range(tp) for r in m.tp_regions(tuple(full.shape), tp, rank)]
        assert sorted(off for _, off, _ in stored) == sorted(off for off, _ in regions)
        covered = torch.zeros(full.shape, dtype=torch.int64)
        for rank, off, data in stored:
            region = (off, tuple(data.shape))
            assert region in m.tp_regions(tuple(full.shape), tp, rank)
            assert torch.equal(data, mp.block(full, region)), (tp, rank, off)
            mp.block(covered, region).add_(1)
        expect = 1  # every element stored exactly once per TP layout
        assert torch.equal(covered, torch.full_like(covered, expect)), tp
        # and back: the streaming read plan (if any) rebuilds the HF tensors from these chunks
        chunks = [(off, tuple(data.shape)) for _, off, data in stored]
        plan = m.read_plan(chunks, ARCH, padded, 0)
        if plan is None:
            continue
        got: dict[str, list[torch.Tensor]] = {}
        for name, region, rows in plan:
            t = mp.block(full, region)
            got.setdefault(name, []).append(t if rows is None else t[:rows])
        names = m.hf_names(0)
        assert list(got) == list(names)
        for name, want in zip(names, hf):
            assert torch.equal(torch.cat(got[name]), want), (name, tp)


def test_qwen2_mapping_names_and_tying():
    untied = get_family("qwen2").mapping(ARCH)
    assert [m.mcore for m in untied.tensors][-1] == mp.OUTPUT and untied.tied is None
    tied_arch = ModelArch(**{**arch_to_dict(ARCH), "tie_word_embeddings": True})
    tied = get_family("qwen2").mapping(tied_arch)
    assert mp.OUTPUT not in [m.mcore for m in tied.tensors]
    assert tied.tied == ("lm_head.weight", "model.embed_tokens.weight")
    order = untied.order(ARCH.num_layers)
    assert order[0][0].mcore == mp.EMBED and order[1] == (untied.layer[0], 0)
    assert order[-1][0].mcore == mp.OUTPUT and len(order) == 3 + 2 * len(untied.layer)


def test_tiny_builder_goes_through_the_family(tmp_path):
    from sfmed.utils.tiny import make_tiny_model

    out = make_tiny_model(
        tmp_path / "m",
        "qwen2",
        num_layers=1,
        hidden_size=16,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=32,
        vocab_size=64,
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] == 1
    arch = arch_from_hf_config(out)
    assert (arch.hidden_size, arch.num_query_groups, arch.vocab_size) == (16, 1, 64)
