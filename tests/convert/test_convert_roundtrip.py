"""HF -> Megatron (torch_dist) -> HF is exact over tied/untied, GQA/MHA, TP in {1,2,4},
PP in {1,2}; the stored layout follows megatron-core's (QKV per query group, [gate; up],
zero vocab padding). Pure Python: the writer and reader are single-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sfmed.convert import checkpoint_arch, convert_hf_to_mcore, convert_mcore_to_hf
from sfmed.convert import keymap as km
from sfmed.convert.quickstart import compare_hf_folders
from sfmed.core import megatron_layout as layout
from sfmed.core.torch_dist import TorchDistReader, owned_copy
from sfmed.models import checkpoint_vocab_size, get_family, padded_vocab_size
from sfmed.models import mapping as T
from sfmed.models.families.qwen2 import HF_EMBED, HF_LM_HEAD

VARIANTS = {
    "untied_gqa": dict(tie_word_embeddings=False, num_kv_heads=4),  # 4 KV heads: TP=4 fits
    "tied_gqa": dict(tie_word_embeddings=True, num_kv_heads=4),
    "untied_mha": dict(tie_word_embeddings=False, num_kv_heads=8),
    "tied_mha": dict(tie_word_embeddings=True, num_kv_heads=8),
}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118
                out[k] = h.get_tensor(k)
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_bit_exact_over_tp_pp(tiny_qwen2_factory, tmp_path, variant):
    hf = tiny_qwen2_factory(**VARIANTS[variant])  # vocab 1000: not a multiple of 128
    for tp in (1, 2, 4):
        for pp in (1, 2):
            ck, back = tmp_path / f"mc_{tp}_{pp}", tmp_path / f"hf_{tp}_{pp}"
            convert_hf_to_mcore(hf, ck, tp=tp, pp=pp, progress=False)
            convert_mcore_to_hf(ck, back, progress=False)
            assert compare_hf_folders(hf, back) == [], (variant, tp, pp)
            assert (back / "config.json").read_bytes() == (hf / "config.json").read_bytes()
            if variant.startswith("tied"):
                assert HF_LM_HEAD not in _tensors(back)
            files = sorted(p.name for p in (ck / "release").glob("*.distcp"))
            assert files == [f"__{r}_0.distcp" for r in range(tp * pp)], files


def test_stored_layout(tiny_qwen2_factory, tmp_path):
    """QKV interleaved per query group, fc1 = [gate; up], padded vocab rows zero, layer axis."""
    hf = tiny_qwen2_factory()
    src = _tensors(hf)
    convert_hf_to_mcore(hf, tmp_path / "ck", tp=2, pp=2, progress=False)
    r = TorchDistReader(tmp_path / "ck" / "release")
    heads, groups, d, h = 8, 2, 8, 64
    qkv = r.read(km.QKV_W, (1, 0, 0), (1, (heads + 2 * groups) * d, h))[0]
    q = src["model.layers.1.self_attn.q_proj.weight"]
    k = src["model.layers.1.self_attn.k_proj.weight"]
    v = src["model.layers.1.self_attn.v_proj.weight"]
    per = heads // groups
    row = 0
    for g in range(groups):  # an explicit loop, independent of tensors.fuse_qkv
        for head in range(g * per, (g + 1) * per):
            assert torch.equal(qkv[row : row + d], q[head * d : (head + 1) * d])
            row += d
        assert torch.equal(qkv[row : row + d], k[g * d : (g + 1) * d])
        assert torch.equal(qkv[row + d : row + 2 * d], v[g * d : (g + 1) * d])
        row += 2 * d
    fc1 = r.read(km.FC1_W, (3, 0, 0), (1, 256, h))[0]
    assert torch.equal(fc1[:128], src["model.layers.3.mlp.gate_proj.weight"])
    assert torch.equal(fc1[128:], src["model.layers.3.mlp.up_proj.weight"])
    emb = r.read(km.EMBED, (0, 0), r.shape(km.EMBED))
    assert r.shape(km.EMBED) == (1024, h)
    assert torch.equal(emb[:1000], src[HF_EMBED])
    assert not emb[1000:].any()
    assert r.shape(km.QKV_NORM) == (4, h) and r.shape(km.FC2_W) == (4, h, 128)
    # the chunk grid megatron-core uses at TP=2: fc1 is a gate block plus an up block per rank
    assert sorted(c for c in r.chunks(km.FC1_W) if c[0][0] == 0) == [
        ((0, 0, 0), (1, 64, h)),
        ((0, 64, 0), (1, 64, h)),
        ((0, 128, 0), (1, 64, h)),
        ((0, 192, 0), (1, 64, h)),
    ]
    assert r.read_object(km.extra_state_key("mlp.linear_fc1", 2, 4)) == [None]


def test_metadata_and_vocab_padding(tiny_qwen2_factory, tmp_path):
    """sfmed.json records what loaders need; the padded vocabulary does not depend on TP <= 8."""
    hf = tiny_qwen2_factory()
    for tp in (1, 2, 4):
        assert checkpoint_vocab_size(1000, tp) == 1024
    assert checkpoint_vocab_size(152064, 2) == 152576  # Qwen2-7B: 1024-aligned
    assert checkpoint_vocab_size(152064, 2, pad_for_tp=1) == padded_vocab_size(152064, 2)
    convert_hf_to_mcore(hf, tmp_path / "ck", tp=1, pp=2, layers_per_stage=[1, 3], progress=False)
    assert layout.read_tracker(tmp_path / "ck") == "release"
    meta = layout.read_meta(tmp_path / "ck" / "release")
    assert meta["padded_vocab_size"] == 1024 and meta["tp"] == 1 and meta["pp"] == 2
    assert meta["arch"]["num_query_groups"] == 2 and meta["origin"]["kind"] == "hf"
    arch, padded = checkpoint_arch(tmp_path / "ck")
    assert (arch.vocab_size, padded) == (1000, 1024)
    # uneven stages: layer 0 on stage 0 (file of rank 0), layers 1-3 on stage 1 (rank 1)
    r = TorchDistReader(tmp_path / "ck" / "release")
    where = {
        i.offset[0]: s.relative_path
        for i, s in r.metadata.storage_data.items()
        if i.fqn == km.PROJ_W
    }
    assert where == {0: "__0_0.distcp", 1: "__1_0.distcp", 2: "__1_0.distcp", 3: "__1_0.distcp"}
    assert (
        json.loads((tmp_path / "ck" / "release" / "metadata.json").read_text())["sharded_backend"]
        == "torch_dist"
    )
    assert torch.load(tmp_path / "ck" / "release" / "common.pt") == {
        "checkpoint_version": 3.0,
        "iteration": 0,
    }


def test_bf16_sharded_output_loads_in_transformers(tiny_qwen2_factory, tmp_path):
    """bf16 stays exact; a small max_shard_size gives several shards + index that transformers
    loads as Qwen2ForCausalLM with the same logits."""
    from transformers import Qwen2ForCausalLM

    hf = tiny_qwen2_factory(dtype=torch.bfloat16, tie_word_embeddings=True)
    convert_hf_to_mcore(hf, tmp_path / "ck", tp=2, pp=1, progress=False)
    convert_mcore_to_hf(tmp_path / "ck", tmp_path / "back", max_shard_size="100kB", progress=False)
    names = sorted(p.name for p in (tmp_path / "back").glob("*.safetensors"))
    assert len(names) > 2 and (tmp_path / "back" / "model.safetensors.index.json").is_file()
    assert compare_hf_folders(hf, tmp_path / "back") == []
    a = Qwen2ForCausalLM.from_pretrained(str(hf))
    b = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "back"))
    assert b.dtype == torch.bfloat16
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_dtype_cast_on_export(tiny_qwen2_factory, tmp_path):
    hf = tiny_qwen2_factory()
    convert_hf_to_mcore(hf, tmp_path / "ck", progress=False)
    convert_mcore_to_hf(tmp_path / "ck", tmp_path / "back", dtype=torch.bfloat16, progress=False)
    a, b = _tensors(hf), _tensors(tmp_path / "back")
    assert all(
        b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16)) for k in a
    )
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_pure_tensor_functions_invert():
    q, k, v = torch.randn(48, 5), torch.randn(12, 5), torch.randn(12, 5)
    fused = T.fuse_qkv(q, k, v, num_heads=8, num_groups=2)
    assert all(torch.equal(a, b) for a, b in zip(T.split_qkv(fused, 8, 2), (q, k, v)))
    g, u = torch.randn(6, 3), torch.randn(6, 3)
    assert all(torch.equal(a, b) for a, b in zip(T.split_gate_up(T.fuse_gate_up(g, u)), (g, u)))
    assert T.SplitCols("w", ("w",)).tp_regions((4, 8), 2, 1) == [((0, 4), (4, 4))]
    assert T.Replicated("n", ("n",)).tp_regions((4,), 2, 1) == []
    view = torch.arange(10.0)[2:5]
    owned = owned_copy(view)
    assert owned.untyped_storage().nbytes() == 12 and torch.equal(owned, view)


def test_tp_blocks_equal_blocks_of_fused_tensor():
    """The copy-saving block builder agrees with slicing the fused global tensor."""
    from sfmed.models import ModelArch

    arch = ModelArch(
        num_layers=1,
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
    for m in get_family("qwen2").mapping(arch).layer:
        hf = [torch.randn(s) for s in m.hf_shapes(arch)]
        full = m.to_mcore(hf, arch)
        for tp in (1, 2, 4):
            for r in range(tp):
                blocks = m.tp_blocks(hf, arch, tp, r)
                regions = m.tp_regions(tuple(full.shape), tp, r)
                assert [o for o, _ in blocks] == [o for o, _ in regions], m.mcore
                for (_, data), region in zip(blocks, regions):
                    assert torch.equal(data, T.block(full, region)), (m.mcore, tp, r)
