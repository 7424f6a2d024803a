"""Pure tensor layout functions: QKV interleave per query group, gate|up, vocabulary padding and
the tensor-parallel chunk grid of megatron-core's checkpoints. No I/O here.

Shapes are those of one layer (the checkpoint stacks layer tensors over a leading axis).
"""

from __future__ import annotations

import torch

from sfmed.convert import keymap as km
from sfmed.models.qwen2 import Qwen2Arch

Region = tuple[tuple[int, ...], tuple[int, ...]]
"""(offsets, sizes) of a block of a tensor."""


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int):
    """HF q/k/v (weights [out, in] or biases [out]) -> megatron's ``[q_g, k_g, v_g]`` per group."""
    rest = q.shape[1:]
    q = q.reshape(num_groups, -1, *rest)
    k = k.reshape(num_groups, -1, *rest)
    v = v.reshape(num_groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int):
    """Inverse of :func:`fuse_qkv`: megatron's fused QKV -> contiguous HF (q, k, v)."""
    rest = qkv.shape[1:]
    per_group = qkv.shape[0] // num_groups
    head_dim = per_group // (num_heads // num_groups + 2)
    g = qkv.reshape(num_groups, per_group, *rest)
    q_rows = per_group - 2 * head_dim
    q = g[:, :q_rows].reshape(-1, *rest)
    k = g[:, q_rows : q_rows + head_dim].reshape(-1, *rest)
    v = g[:, q_rows + head_dim :].reshape(-1, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[gate; up]``: the global layout of megatron's SwiGLU ``linear_fc1`` in a checkpoint."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor):
    """Inverse of :func:`fuse_gate_up`."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def to_mcore(m: km.TensorMap, hf: list[torch.Tensor], arch: Qwen2Arch) -> torch.Tensor:
    """HF tensors of one map (one layer) -> the megatron global tensor (vocab rows unpadded)."""
    if m.kind == "qkv":
        return fuse_qkv(*hf, arch.num_attention_heads, arch.num_query_groups)
    if m.kind == "gate_up":
        return fuse_gate_up(*hf)
    (t,) = hf
    return t


def to_hf(m: km.TensorMap, t: torch.Tensor, arch: Qwen2Arch) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`to_mcore` (vocab rows must already be stripped)."""
    if m.kind == "qkv":
        return split_qkv(t, arch.num_attention_heads, arch.num_query_groups)
    if m.kind == "gate_up":
        return split_gate_up(t)
    return (t,)


def hf_shapes(m: km.TensorMap, arch: Qwen2Arch) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors behind ``m`` (one layer)."""
    h, d = arch.hidden_size, arch.kv_channels
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    return {
        km.EMBED: [(arch.vocab_size, h)],
        km.OUTPUT: [(arch.vocab_size, h)],
        km.FINAL_NORM: [(h,)],
        km.QKV_NORM: [(h,)],
        km.FC1_NORM: [(h,)],
        km.QKV_W: [(q, h), (kv, h), (kv, h)],
        km.QKV_B: [(q,), (kv,), (kv,)],
        km.PROJ_W: [(h, q)],
        km.FC1_W: [(arch.ffn_hidden_size, h)] * 2,
        km.FC2_W: [(h, arch.ffn_hidden_size)],
    }[m.mcore]


def mcore_shape(m: km.TensorMap, arch: Qwen2Arch, padded_vocab: int) -> tuple[int, ...]:
    """Global shape of one layer's megatron tensor (vocab tensors padded to ``padded_vocab``)."""
    shapes = hf_shapes(m, arch)
    if m.kind == "vocab":
        return (padded_vocab, arch.hidden_size)
    if len(shapes) == 1:
        return shapes[0]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def tp_chunks(layout: str, shape: tuple[int, ...], tp: int, rank: int) -> list[Region]:
    """The blocks of a (one-layer) global tensor that TP rank ``rank`` of ``tp`` holds.

    Mirrors megatron-core's sharded_state_dict: column-parallel rows and row-parallel columns
    split evenly, SwiGLU's fc1 as a gate block plus an up block, replicated tensors whole
    (stored once, by TP rank 0).
    """
    if layout == km.REPLICATED:
        return [((0,) * len(shape), tuple(shape))] if rank == 0 else []
    if layout in (km.ROWS, km.COLS):
        axis = 0 if layout == km.ROWS else 1
        size = shape[axis] // tp
        offsets = [0] * len(shape)
        offsets[axis] = rank * size
        sizes = list(shape)
        sizes[axis] = size
        return [(tuple(offsets), tuple(sizes))]
    if layout == km.GATE_UP:
        half = shape[0] // 2
        size = half // tp
        rest = tuple(shape[1:])
        zeros = (0,) * len(rest)
        return [
            ((rank * size, *zeros), (size, *rest)),
            ((half + rank * size, *zeros), (size, *rest)),
        ]
    raise ValueError(f"unknown TP layout {layout!r}")


def tp_blocks(
    m: km.TensorMap, hf: list[torch.Tensor], arch: Qwen2Arch, tp: int, rank: int
) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """(offsets, data) of the blocks TP rank ``rank`` stores of the (one-layer, non-vocab)
    megatron tensor made of the HF tensors ``hf``.

    Built straight from the HF tensors: each block costs one copy and no fused full tensor is
    materialised. Equals ``block(to_mcore(m, hf, arch), region)`` for every region of
    :func:`tp_chunks`.
    """
    shape = mcore_shape(m, arch, 0)
    regions = tp_chunks(m.tp, shape, tp, rank)
    if m.kind == "qkv":
        ((offsets, sizes),) = regions
        groups = arch.num_query_groups // tp
        per_group = arch.num_attention_heads // arch.num_query_groups
        d = arch.kv_channels
        q, k, v = hf
        q = q.narrow(0, rank * groups * per_group * d, groups * per_group * d)
        k = k.narrow(0, rank * groups * d, groups * d)
        v = v.narrow(0, rank * groups * d, groups * d)
        return [(offsets, fuse_qkv(q, k, v, groups * per_group, groups))]
    if m.kind == "gate_up":
        half = shape[0] // 2
        out = []
        for offsets, sizes in regions:
            src = hf[offsets[0] // half]
            out.append((offsets, owned_copy(src.narrow(0, offsets[0] % half, sizes[0]))))
        return out
    (t,) = hf
    return [(offsets, owned_copy(block(t, (offsets, sizes)))) for offsets, sizes in regions]


def block(t: torch.Tensor, region: Region) -> torch.Tensor:
    """A view of ``t`` restricted to ``region``."""
    for axis, (off, size) in enumerate(zip(*region)):
        t = t.narrow(axis, off, size)
    return t


def owned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that owns exactly its bytes.

    torch.save writes a tensor's whole storage, so a view of a larger tensor must be copied first.
    """
    t = t.contiguous()
    if t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def padded_rows(rows: torch.Tensor, start: int, count: int, valid: int) -> torch.Tensor:
    """Rows ``[start, start+count)`` of a vocab tensor of which only the first ``valid`` rows
    exist (``rows`` holds ``[start, min(start+count, valid))``); padding rows are zero."""
    have = max(0, min(start + count, valid) - start)
    if have == count:
        return rows
    out = torch.zeros((count, *rows.shape[1:]), dtype=rows.dtype)
    out[:have] = rows[:have]
    return out
