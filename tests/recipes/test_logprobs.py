"""Sequence log-probs from megatron-core's vocab-parallel cross-entropy.

The reference everywhere is ``log_softmax`` over the full vocabulary, ``gather`` and a masked
sum, written here independently of the module under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import parse_result
from sfmed.recipes.logprobs import reduce_token_logprobs, sequence_logprobs, token_logprobs

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tp1():
    """A one-process gloo group and megatron's parallel state at TP=1 (torn down after)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized() or parallel_state.model_parallel_is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from sfmed.core.ports import free_port

    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def reference(logits, labels, mask, segments=None, nseg=0):
    """Full-vocabulary log-probs: log_softmax, gather the label, sum where the mask is set."""
    tok = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    keep = mask != 0
    if segments is None:
        return torch.where(keep, tok, 0.0).sum(1), keep.sum(1)
    sums = torch.zeros(labels.shape[0], nseg, dtype=torch.float64)
    counts = torch.zeros(labels.shape[0], nseg, dtype=torch.long)
    for i in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            j = int(segments[i, t])
            if keep[i, t] and j >= 0:
                sums[i, j] = sums[i, j] + tok[i, t]
                counts[i, j] += 1
    return sums, counts


def make(b=3, s=10, v=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(b, s, v, generator=g)
    labels = torch.randint(0, v, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.35).float()
    mask[0] = 0  # a sequence with nothing to score
    labels[mask == 0] = -100  # unused labels may be anything
    return logits, labels, mask


@pytest.mark.parametrize("layout", ["bsv", "sbv"])
def test_tp1_values_and_gradients_match_log_softmax(tp1, layout):
    logits, labels, mask = make()
    leaf = logits.clone().requires_grad_()
    x = leaf if layout == "bsv" else leaf.transpose(0, 1)
    logps, counts = sequence_logprobs(x.clone(), labels, mask, layout=layout)
    ref_leaf = logits.double().requires_grad_()
    ref, ref_counts = reference(ref_leaf, labels, mask)
    assert logps.dtype == torch.float32 and counts.dtype == torch.long
    assert torch.equal(counts, ref_counts) and counts[0] == 0 and logps[0] == 0
    assert torch.allclose(logps.double(), ref, rtol=1e-6, atol=1e-5)
    w = torch.tensor([0.3, -1.2, 2.0])
    (logps * w).sum().backward()
    (ref * w.double()).sum().backward()
    assert torch.allclose(leaf.grad.double(), ref_leaf.grad, atol=1e-6)
    # masked positions and the empty sequence get exactly zero gradient
    assert leaf.grad[0].abs().max() == 0 and leaf.grad[mask == 0].abs().max() == 0


def test_tp1_packed_segments(tp1):
    logits, labels, mask = make(b=2, s=12, seed=1)
    mask[0] = 1
    labels[0] = torch.randint(0, 17, (12,))
    segs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, -1, -1], [0] * 6 + [1] * 6])
    leaf = logits.clone().requires_grad_()
    logps, counts = sequence_logprobs(leaf.clone(), labels, mask, segment_ids=segs)
    ref_leaf = logits.double().requires_grad_()
    ref, ref_counts = reference(ref_leaf, labels, mask, segs, 3)
    assert logps.shape == (2, 3) and torch.equal(counts, ref_counts)
    assert counts[0].tolist() == [3, 4, 3] and counts[1, 2] == 0
    assert torch.allclose(logps.double(), ref, rtol=1e-6, atol=1e-5)
    w = torch.randn(2, 3, generator=torch.Generator().manual_seed(3))
    (logps * w).sum().backward()
    (ref * w.double()).sum().backward()
    assert torch.allclose(leaf.grad.double(), ref_leaf.grad, atol=1e-6)
    # an explicit num_segments pads with empty segments; too small is refused
    more, more_counts = sequence_logprobs(logits.clone(), labels, mask, segs, num_segments=5)
    assert more.shape == (2, 5) and more_counts[:, 3:].sum() == 0
    assert torch.allclose(more[:, :3], logps.detach())
    with pytest.raises(ValueError, match="num_segments=2"):
        sequence_logprobs(logits.clone(), labels, mask, segs, num_segments=2)


def test_tp1_bf16_logits_are_scored_in_fp32_and_left_intact(tp1):
    logits, labels, mask = make(seed=2)
    x = logits.bfloat16()
    before = x.clone()
    logps, _ = sequence_logprobs(x, labels, mask)
    assert logps.dtype == torch.float32 and torch.equal(x, before)
    ref, _ = reference(x.float(), labels, mask)
    assert torch.allclose(logps.double(), ref, rtol=1e-5, atol=1e-4)


def test_tp1_bad_inputs(tp1):
    logits, labels, mask = make()
    bad = labels.clone()
    bad[1, mask[1].nonzero()[0, 0]] = 17  # a scored label outside the vocabulary
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 17\)"):
        sequence_logprobs(logits.clone(), bad, mask)
    with pytest.raises(ValueError, match="layout"):
        token_logprobs(logits.clone(), labels, layout="sb")
    with pytest.raises(ValueError, match="expected"):
        token_logprobs(logits.clone(), labels.T, layout="bsv")
    with pytest.raises(ValueError, match="3-D"):
        token_logprobs(logits[0].clone(), labels[0])
    with pytest.raises(ValueError, match="loss_mask"):
        reduce_token_logprobs(torch.zeros(3, 10), torch.zeros(3, 9))
    with pytest.raises(ValueError, match="segment_ids"):
        reduce_token_logprobs(torch.zeros(3, 10), mask, torch.zeros(3, 9, dtype=torch.long))


def test_reduce_ignores_non_finite_values_at_masked_positions():
    vals = torch.tensor([[-1.0, float("-inf"), -2.0], [float("nan"), -0.5, -0.25]])
    vals.requires_grad_()
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]])
    sums, counts = reduce_token_logprobs(vals, mask)
    assert sums.tolist() == [-3.0, -0.75] and counts.tolist() == [2, 2]
    sums.sum().backward()
    assert vals.grad.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    empty, n = reduce_token_logprobs(torch.zeros(0, 4), torch.zeros(0, 4))
    assert empty.shape == (0,) and n.shape == (0,)


@pytest.mark.dist
@pytest.mark.slow
def test_tp2_matches_full_vocabulary(torchrun):
    """TP=2 under the CPU emulation: vocab shards vs the full vocabulary, values and gradients,
    on random logits and on a real GPTModel (whose logits come back as [b, s, v/tp])."""
    res = parse_result(torchrun(HERE / "worker_logprobs.py", nproc=2, timeout=300).stdout)
    for tag in ("bsv", "sbv", "bsv_seg", "sbv_seg"):
        r = res["synthetic"][tag]
        assert r["shape"] == ([3] if "seg" not in tag else [3, 2]), tag
        assert r["value_diff"] < 1e-4, (tag, r)
        assert r["grad_diff"] < 1e-5 * max(1.0, r["grad_norm"]), (tag, r)
        assert r["counts_equal"] and r["same_on_ranks"], (tag, r)
    m = res["model"]
    assert m["logits_shape"] == [2, 16, 128]  # [b, s, v/tp] with labels=None
    assert m["ce_shape"] == [2, 16]  # per-token CE [b, s] with labels
    assert m["counts"] == [7, 12]
    assert m["value_diff"] < 1e-4 and m["via_labels_diff"] < 1e-4, m
    assert m["grad_diff"] < 1e-5 * m["grad_scale"], m
    assert m["same_on_ranks"]
    # the logits are far from uniform, so agreement is not an accident of symmetry
    assert all(abs(v - u) > 1.0 for v, u in zip(m["values"], m["uniform"])), m
