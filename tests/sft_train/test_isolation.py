"""Packing without cross-talk, proved on megatron-core's real schedules under CPU emulation.

One torchrun launch per layout checks several things: at TP=2×PP=2 the loss of the packed
samples equals the token-weighted sum of the same conversations run one by one (≤ 1e-5, fp32),
and mbs=1 × 4 micro-batches equals mbs=2 × 2 (loss and every local gradient, ≤ 1e-6); at PP=3
(a middle stage) the loss and the gradients equal the one-by-one run, and a forward step that
drops the boundaries on the middle stage (the known bug) is caught.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sft_train_helpers import pack_greedy, random_conversations, write_sft_dataset

from conftest import parse_result

HERE = Path(__file__).parent
SEQ, VOCAB = 64, 256


@pytest.fixture(scope="module")
def packed_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_iso")
    rng = np.random.default_rng(7)
    convs = random_conversations(16, rng, 4, 18, VOCAB)
    packs = pack_greedy(convs, SEQ - 4)  # every pack gets a padding sequence too
    assert len(packs) == 4 and all(len(p) >= 2 for p in packs)
    prefix = write_sft_dataset(tmp / "iso_sft", packs, SEQ, VOCAB)
    order = [c for p in packs for c in p]
    arrays = {f"ids{i}": c[0] for i, c in enumerate(order)}
    arrays.update({f"mask{i}": c[1] for i, c in enumerate(order)})
    np.savez(tmp / "convs.npz", n=len(order), **arrays)
    return prefix, tmp / "convs.npz"


def test_block_causal_mask_by_hand():
    from sfmed.models.attention import block_causal_mask

    m = block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)
    expect = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    ).bool()
    assert torch.equal(m, expect)
    with pytest.raises(ValueError, match="covers 5 tokens"):
        block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 6)


def test_packed_attention_equals_each_sequence_alone():
    """CPU kernel (dense block-diagonal mask, GQA 4 heads / 2 groups) vs causal SDPA per
    sequence; the output is [t, heads * head_dim] as megatron's THD path expects."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from megatron.core.packed_seq_params import PackedSeqParams

    from sfmed.models.attention import packed_attention

    g = torch.Generator().manual_seed(0)
    lens = [5, 1, 9, 3]
    t, h, kv, d = sum(lens), 4, 2, 8
    q = torch.randn(t, h, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(t, kv, d, generator=g, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    mod = SimpleNamespace(dropout_p=0.0, training=False, num_heads=h, num_groups=kv, head_dim=d,
                          softmax_scale=0.3)  # fmt: skip
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=9, max_seqlen_kv=9)  # fmt: skip
    out = packed_attention(mod, q, k, v, params)
    assert out.shape == (t, h * d)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs = q[a:b].permute(1, 0, 2)[None]
        ks, vs = (x[a:b].permute(1, 0, 2)[None].repeat_interleave(2, dim=1) for x in (k, v))
        ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=0.3)
        assert torch.allclose(out[a:b], ref[0].permute(1, 0, 2).reshape(b - a, h * d), atol=1e-12)
    with pytest.raises(ValueError, match="qkv_format='thd'"):
        packed_attention(mod, q, k, v, PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu))


def test_packed_seq_params_from_positions():
    from sfmed.recipes.sft import packed_seq_params

    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
    p = packed_seq_params(pos)
    assert p.qkv_format == "thd"
    assert p.cu_seqlens_q.tolist() == [0, 3, 5, 6, 8, 12] and p.cu_seqlens_q.dtype == torch.int32
    assert p.max_seqlen_q == 4 and p.cu_seqlens_kv is p.cu_seqlens_q
    with pytest.raises(ValueError, match="start at 0"):
        packed_seq_params(torch.tensor([[1, 2, 0]]))


@pytest.mark.dist
@pytest.mark.slow
def test_packed_equals_one_by_one_tp2pp2_and_microbatch_split(torchrun, packed_data):
    prefix, convs = packed_data
    res = parse_result(
        torchrun(HERE / "worker_isolation.py", prefix, convs, "tp2pp2", nproc=4).stdout
    )
    pv = res["packed_vs_single"]
    assert pv["packed"][1] == pv["single"][1] > 0  # same supervised tokens
    assert pv["rel"] <= 1e-5, pv
    mb = res["mbs"]
    assert mb["mbs1"][1] == mb["mbs2"][1]
    assert mb["rel"] <= 1e-6 and mb["grad_rel"] <= 1e-6, mb


@pytest.mark.dist
@pytest.mark.slow
def test_packed_equals_one_by_one_pp3_with_gradients(torchrun, packed_data):
    prefix, convs = packed_data
    res = parse_result(torchrun(HERE / "worker_isolation.py", prefix, convs, "pp3", nproc=3).stdout)
    pv = res["packed_vs_single"]
    assert pv["packed"][1] == pv["single"][1] > 0
    assert pv["rel"] <= 1e-5 and pv["grad_rel"] <= 1e-5, pv
    # Losing the boundaries on the middle stage changes the loss: the check has teeth.
    assert pv["leak_rel"] > 1e-4, pv  # ten times the tolerance above
