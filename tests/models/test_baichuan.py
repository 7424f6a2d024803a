"""Baichuan's pieces without torchrun: the W_pack mapping kind, ALiBi slopes and their TP split,
ALiBi inside a packed (THD) SFT batch, the variant rule, and the refusals of what ALiBi cannot
run with."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sfmed.core.errors import ConfigError
from sfmed.models import arch_from_hf_config, get_family
from sfmed.models import mapping as mp
from sfmed.models.attention import alibi_slopes, enable_alibi


def _arch(**kw):
    cfg = dict(
        model_type="baichuan", hidden_size=96, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=12, vocab_size=1000, model_max_length=256,
    )  # fmt: skip
    return arch_from_hf_config({**cfg, **kw})


def test_w_pack_is_q_k_v_stacked_and_reinterleaved_per_head():
    arch = _arch()
    m = next(t for t in get_family("baichuan").mapping(arch).layer if isinstance(t, mp.PackedQKV))
    h, heads = 96, 12
    d = h // heads
    w = torch.randn(3 * h, h)
    q, k, v = w[:h], w[h : 2 * h], w[2 * h :]
    # megatron-core: per head j, [q_j; k_j; v_j]
    want = torch.cat([torch.cat([q[j * d : (j + 1) * d], k[j * d : (j + 1) * d],
                                 v[j * d : (j + 1) * d]]) for j in range(heads)])  # fmt: skip
    full = m.to_mcore([w], arch)
    assert torch.equal(full, want)
    assert torch.equal(m.to_hf(full, arch)[0], w)
    for tp in (1, 2, 3, 4, 6, 12):
        rows = want.shape[0] // tp
        for rank in range(tp):
            ((off, data),) = m.tp_blocks([w], arch, tp, rank)
            assert off == (rank * rows, 0) and torch.equal(
                data, want[rank * rows : (rank + 1) * rows]
            )


def test_variant_rule_follows_the_releases():
    assert _arch(hidden_size=4096, num_attention_heads=32).position_embedding_type == "rope"
    assert _arch(hidden_size=5120, num_attention_heads=40).position_embedding_type == "alibi"
    assert _arch(vocab_size=125696).norm_head and not _arch(vocab_size=64000).norm_head
    explicit = _arch(position_embedding_type="rope", norm_head=True)
    assert (explicit.position_embedding_type, explicit.norm_head) == ("rope", True)
    with pytest.raises(ConfigError, match="position_embedding_type='yarn'"):
        _arch(position_embedding_type="yarn")
    with pytest.raises(ConfigError, match="W_pack holds full multi-head"):
        _arch(num_key_value_heads=4)


def test_alibi_slopes_and_their_tp_split():
    # power of two: 2^(-8/n * (i+1))
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads (2^-0.5, 2^-1.5...)
    want = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(i + 0.5) for i in range(4)]
    assert torch.allclose(alibi_slopes(12), torch.tensor(want))
    # a rank gets the slopes of its contiguous heads
    from sfmed.models.attention import SDPAttention

    fake = SDPAttention.__new__(SDPAttention)
    torch.nn.Module.__init__(fake)
    fake.num_heads = 3
    enable_alibi(fake, 12, tp_rank=2)
    assert torch.allclose(fake.alibi_slopes, torch.tensor(want[6:9]))


def test_alibi_refuses_other_attention_and_context_parallelism():
    class Other:
        pass

    with pytest.raises(ValueError, match="model.attention_backend=sdpa"):
        enable_alibi(Other(), 12, 0)
    arch = _arch(position_embedding_type="alibi")
    model = SimpleNamespace(config=SimpleNamespace(context_parallel_size=2))
    with pytest.raises(ConfigError, match="not supported with context parallelism.*parallel.cp=1"):
        get_family("baichuan").finish_model(model, arch)


def test_verify_needs_the_hub_code(tmp_path):
    hf = get_family("baichuan").make_tiny(tmp_path / "hf")
    with pytest.raises(ConfigError, match="modeling_baichuan.py"):
        get_family("baichuan").reference_logits(hf, torch.zeros(1, 4, dtype=torch.long),
                                                torch.float32, "cpu")  # fmt: skip


def test_packed_alibi_equals_baichuan_attention_per_sequence():
    """A THD pack (SFT) with ALiBi: each sequence gets Baichuan-13B's attention alone, written
    out by hand (scores + slope_h * key position within the sequence, causal, softmax) — the
    bias restarts per sequence and never leaks across, in fp64 and in bf16."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from sfmed.models.attention import packed_attention

    g = torch.Generator().manual_seed(0)
    lens, h, d, scale = [6, 1, 11, 4], 4, 8, 0.35
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    slopes = alibi_slopes(12)[4:8]  # a TP rank's share: heads 4..7 of 12
    mod = SimpleNamespace(dropout_p=0.0, training=False, num_heads=h, num_groups=h, head_dim=d,
                          softmax_scale=scale, alibi_slopes=slopes)  # fmt: skip
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=11, max_seqlen_kv=11)  # fmt: skip
    out = packed_attention(mod, q, k, v, params)
    ref = torch.empty_like(out)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        n = b - a
        for head in range(h):
            scores = (q[a:b, head] @ k[a:b, head].T) * scale
            scores = scores + slopes[head].double() * torch.arange(n, dtype=torch.float64)
            scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
            ref[a:b, head * d : (head + 1) * d] = scores.softmax(-1) @ v[a:b, head]
    assert torch.allclose(out, ref, atol=1e-12)
    no_alibi = packed_attention(SimpleNamespace(**{**vars(mod), "alibi_slopes": None}), q, k, v,
                                params)  # fmt: skip
    assert (no_alibi - ref).abs().max() > 1e-2  # the bias matters for this input
    half = packed_attention(mod, *(x.bfloat16() for x in (q, k, v)), params)
    assert (half.double() - ref).abs().max() < 5e-2
