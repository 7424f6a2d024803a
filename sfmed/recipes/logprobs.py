"""Per-sequence (or per-segment) log-probabilities from vocab-parallel logits.

DPO scores each answer by the sum of its tokens' log-probs. On a tensor-parallel rank the
output layer of megatron-core's ``GPTModel`` holds only ``vocab / tp`` columns of the logits; a
152k vocabulary must never be gathered on one rank. ``log p(label) = -CE``, and megatron-core's
``vocab_parallel_cross_entropy`` computes CE with three all-reduces of ``[tokens]``-sized
tensors over the tensor-parallel group, and its backward produces the gradient of every rank's
shard locally. This module uses it as is and only adds the masked per-sequence reduction.

Layouts (megatron-core 0.16): ``GPTModel.forward(..., labels=None)`` returns the output layer's
``[s, b, v/tp]`` transposed to ``[b, s, v/tp]`` (``layout="bsv"``, the default here); the
output layer itself returns ``[s, b, v/tp]`` (``layout="sbv"``). With ``labels`` given,
``GPTModel`` returns the per-token CE ``[b, s]`` instead: pass ``-loss`` to
:func:`reduce_token_logprobs` (that path also covers the fused CE kernels).
"""

from __future__ import annotations

import torch

LAYOUTS = ("bsv", "sbv")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, layout: str = "bsv") -> torch.Tensor:
    """``[b, s]`` fp32 log-prob of each label under this TP rank's vocab-parallel logits.

    ``labels[i, t]`` is the token that ``logits`` at position ``t`` of sequence ``i`` predicts
    (already shifted, megatron's convention). At positions a mask later drops, labels may be
    anything (e.g. -100): the kernel maps ids outside the vocabulary to a finite dummy value.

    megatron-core's kernel overwrites fp32 ``logits`` in place to save memory (bf16/fp16
    logits are upcast into a copy first); pass a clone if you need fp32 logits afterwards.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {list(LAYOUTS)}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be 3-D ({layout}), got shape {tuple(logits.shape)}")
    b, s = (logits.shape[0], logits.shape[1]) if layout == "bsv" else logits.shape[1::-1]
    if tuple(labels.shape) != (b, s):
        raise ValueError(
            f"labels have shape {tuple(labels.shape)}, expected [b, s] = {[b, s]} for "
            f"{layout} logits of shape {tuple(logits.shape)}"
        )
    # The kernel flattens every leading dimension (with .view: it needs contiguous logits), so
    # labels only need the logits' layout.
    target = labels if layout == "bsv" else labels.transpose(0, 1)
    logps = -vocab_parallel_cross_entropy(logits.contiguous(), target.contiguous())
    return logps if layout == "bsv" else logps.transpose(0, 1)


def reduce_token_logprobs(
    token_logps: torch.Tensor,
    loss_mask: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum masked per-token log-probs per sequence, or per packed segment.

    Args:
        token_logps: ``[b, s]`` per-token log-probs (e.g. :func:`token_logprobs`, or ``-loss``
            of ``GPTModel(..., labels=...)``).
        loss_mask: ``[b, s]``; non-zero where the token belongs to a scored answer.
        segment_ids: optional ``[b, s]`` integer id of the packed segment each token belongs
            to (``0 .. num_segments-1``, restarting in every row); negative = belongs to none.
        num_segments: segments per row; default ``segment_ids.max() + 1``.

    Returns:
        ``(logps, counts)``: ``[b]`` (or ``[b, num_segments]``) fp32 sums of the masked
        log-probs and int64 counts of the tokens summed. Gradients flow into ``token_logps``.
    """
    if token_logps.dim() != 2 or loss_mask.shape != token_logps.shape:
        raise ValueError(
            f"token_logps {tuple(token_logps.shape)} and loss_mask {tuple(loss_mask.shape)} "
            "must both be [b, s]"
        )
    mask = loss_mask != 0
    vals = token_logps.float()
    if segment_ids is None:
        # where(), not a product: a masked position may hold inf/nan (e.g. an unused label).
        logps = torch.where(mask, vals, torch.zeros_like(vals)).sum(dim=1)
        return logps, mask.sum(dim=1)

    if segment_ids.shape != token_logps.shape:
        raise ValueError(
            f"segment_ids {tuple(segment_ids.shape)} must match token_logps "
            f"{tuple(token_logps.shape)}"
        )
    seg = segment_ids.long()
    if num_segments is None:
        num_segments = int(seg.max().item()) + 1 if seg.numel() else 0
    num_segments = max(int(num_segments), 0)
    if bool((seg >= num_segments).any()):
        raise ValueError(
            f"segment_ids reach {int(seg.max())} but num_segments={num_segments}; "
            "ids must be < num_segments"
        )
    b = token_logps.shape[0]
    keep = mask & (seg >= 0)
    # One flat bucket per (row, segment); dropped tokens add 0 to bucket 0 of their row.
    flat = (torch.arange(b, device=seg.device).unsqueeze(1) * num_segments + seg.clamp(min=0))[keep]
    logps = vals.new_zeros(b * num_segments).index_add(0, flat, vals[keep])
    counts = torch.zeros(b * num_segments, dtype=torch.long, device=seg.device).index_add(
        0, flat, torch.ones_like(flat)
    )
    return logps.view(b, num_segments), counts.view(b, num_segments)


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    layout: str = "bsv",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts per sequence (or per packed segment) from this TP
    rank's vocab-parallel logits, without gathering the vocabulary.

    Composition of :func:`token_logprobs` and :func:`reduce_token_logprobs`; the arguments and
    results are theirs. Every TP rank gets the same (full-vocabulary) values. With context
    parallelism each rank holds part of every sequence, so the sums are partial: all-reduce
    them over the context-parallel group.
    """
    from megatron.core import parallel_state

    vocab = logits.shape[-1] * parallel_state.get_tensor_model_parallel_world_size()
    if labels.shape == loss_mask.shape:  # otherwise the calls below name the mismatch
        bad = (loss_mask != 0) & ((labels < 0) | (labels >= vocab))
        # The kernel would score an out-of-vocabulary label silently; refuse it instead.
        if bool(bad.any()):
            raise ValueError(
                f"{int(bad.sum())} scored labels lie outside the vocabulary [0, {vocab}) "
                f"(e.g. {int(labels[bad][0])}); mask them out with loss_mask"
            )
    return reduce_token_logprobs(
        token_logprobs(logits, labels, layout=layout), loss_mask, segment_ids, num_segments
    )
