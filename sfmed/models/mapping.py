"""Tensor mappings: how HF tensors become megatron-core GPTModel checkpoint tensors and back.

A family's mapping is a :class:`ModelMapping`: a name table of :class:`TensorMapping` objects,
each of one *kind* (replicated, row-split, column-split, QKV interleaved per query group, gate/up
split per TP rank, vocabulary with padded rows). A kind owns everything about its layout in one
place: the HF and megatron shapes, ``to_mcore``/``to_hf``, which blocks each TP rank stores, how
to build those blocks from the HF tensors and how to read the HF tensors back block by block.
The streaming engine in :mod:`sfmed.convert` only iterates over mappings, so a new kind (e.g.
Baichuan's fused ``W_pack``) is one subclass here and no change there.

Shapes are those of one layer; the checkpoint stacks layer tensors over a leading axis. Shape
symbols (``"hidden"``, ``"ffn"``, ``"q"``, ``"kv"``, ``"vocab"``, ``"head_dim"``) are resolved
against the architecture by :func:`dims`. Everything here is pure: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from sfmed.core.torch_dist import owned_copy
from sfmed.models.arch import ModelArch

Region = tuple[tuple[int, ...], tuple[int, ...]]
"""(offsets, sizes) of a block of a tensor."""
Shape = tuple[int, ...]

# megatron-core GPTModel checkpoint keys (``sharded_state_dict()`` of the local or the TE layer
# spec; the local spec maps its norms onto TE's fused names). Every GPT-style family uses these.
EMBED = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
LAYER_PREFIX = "decoder.layers."
QKV_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
QKV_W = "decoder.layers.self_attention.linear_qkv.weight"
QKV_B = "decoder.layers.self_attention.linear_qkv.bias"
Q_NORM = "decoder.layers.self_attention.q_layernorm.weight"
K_NORM = "decoder.layers.self_attention.k_layernorm.weight"
PROJ_W = "decoder.layers.self_attention.linear_proj.weight"
PROJ_B = "decoder.layers.self_attention.linear_proj.bias"
FC1_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
FC1_W = "decoder.layers.mlp.linear_fc1.weight"
FC2_W = "decoder.layers.mlp.linear_fc2.weight"

# Modules whose (empty, for megatron's local linears) ``_extra_state`` GPTModel checkpoints as a
# ShardedObject per layer; dist_checkpointing.load of a local-spec model asks for them.
EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)


def extra_state_key(module: str, layer: int, num_layers: int) -> str:
    """The ShardedObject unique key megatron-core uses for a layer module's ``_extra_state``."""
    return f"{LAYER_PREFIX}{module}._extra_state/shard_{layer}_{num_layers}"


def dims(arch: ModelArch) -> dict[str, int]:
    """Sizes the shape symbols of a mapping stand for."""
    d = arch.kv_channels
    return {
        "hidden": arch.hidden_size,
        "ffn": arch.ffn_hidden_size,
        "q": arch.num_attention_heads * d,
        "kv": arch.num_query_groups * d,
        "head_dim": d,
        "vocab": arch.vocab_size,
    }


def resolve(shape: Sequence[str | int], arch: ModelArch) -> Shape:
    """A shape of symbols/ints as ints for ``arch``."""
    table = dims(arch)
    return tuple(table[s] if isinstance(s, str) else int(s) for s in shape)


# ---- pure layout functions --------------------------------------------------------------------


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


def block(t: torch.Tensor, region: Region) -> torch.Tensor:
    """A view of ``t`` restricted to ``region``."""
    for axis, (off, size) in enumerate(zip(*region)):
        t = t.narrow(axis, off, size)
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


def split_regions(shape: Shape, axis: int, tp: int, rank: int) -> list[Region]:
    """The one block of ``shape`` that TP rank ``rank`` of ``tp`` holds when split on ``axis``."""
    size = shape[axis] // tp
    offsets = [0] * len(shape)
    offsets[axis] = rank * size
    sizes = list(shape)
    sizes[axis] = size
    return [(tuple(offsets), tuple(sizes))]


# ---- mapping kinds ----------------------------------------------------------------------------


class HFSource(Protocol):
    """Where the HF tensors come from (the engine's reader of safetensors shards)."""

    def get(self, name: str) -> torch.Tensor: ...

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...


Block = tuple[int, tuple[int, ...], torch.Tensor]
"""(TP rank, offsets in the one-layer megatron tensor, data) of one stored chunk."""
ReadPiece = tuple[str, Region, int | None]
"""(HF name, region of the one-layer megatron tensor, rows to keep or None for all): read the
region (best a whole stored chunk: no resharding copy) and write its first rows as they are."""


@dataclass(frozen=True)
class TensorMapping:
    """One megatron checkpoint tensor and the HF tensors it is made of (base kind: one HF tensor,
    same layout on both sides). Subclasses set the TP split and any fusion."""

    mcore: str
    hf: tuple[str, ...]
    """HF names; ``{i}`` stands for the layer index in per-layer tensors."""
    shape: tuple[str | int, ...] = ()
    """HF shape (symbols, see :func:`dims`) of single-tensor kinds."""

    large_blocks = False
    """True when one block may be too big to build while another waits to be written."""

    @property
    def layered(self) -> bool:
        """Stacked over layers in the checkpoint."""
        return self.mcore.startswith(LAYER_PREFIX)

    def hf_names(self, layer: int | None = None) -> tuple[str, ...]:
        """The HF names of this tensor (of ``layer`` for per-layer tensors)."""
        return tuple(n.format(i=layer) for n in self.hf)

    def hf_shapes(self, arch: ModelArch) -> list[Shape]:
        """Shapes of the HF tensors (one layer)."""
        return [resolve(self.shape, arch)]

    def mcore_shape(self, arch: ModelArch, padded_vocab: int) -> Shape:
        """Global shape of one layer's megatron tensor."""
        (s,) = self.hf_shapes(arch)
        return s

    def to_mcore(self, hf: Sequence[torch.Tensor], arch: ModelArch) -> torch.Tensor:
        """HF tensors (one layer) -> the megatron global tensor."""
        (t,) = hf
        return t

    def to_hf(self, t: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, ...]:
        """Inverse of :meth:`to_mcore`."""
        return (t,)

    def tp_regions(self, shape: Shape, tp: int, rank: int) -> list[Region]:
        """The blocks of the (one-layer) global tensor TP rank ``rank`` of ``tp`` stores.

        Mirrors megatron-core's sharded_state_dict; replicated tensors are stored once, by TP
        rank 0.
        """
        return [((0,) * len(shape), tuple(shape))] if rank == 0 else []

    def tp_blocks(
        self, hf: Sequence[torch.Tensor], arch: ModelArch, tp: int, rank: int
    ) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        """(offsets, data) of the blocks TP rank ``rank`` stores, built from the HF tensors.

        Equals ``block(to_mcore(hf, arch), region)`` for every region of :meth:`tp_regions`;
        kinds override it to build blocks without materialising the fused tensor.
        """
        full = self.to_mcore(hf, arch)
        regions = self.tp_regions(tuple(full.shape), tp, rank)
        return [(off, owned_copy(block(full, (off, size)))) for off, size in regions]

    def mcore_blocks(
        self,
        src: HFSource,
        arch: ModelArch,
        tp: int,
        padded_vocab: int,
        dtype: torch.dtype,
        layer: int | None,
    ) -> Iterator[Block]:
        """Every stored block of this tensor (one layer), rank by rank, read from ``src``."""
        hf = [src.get(n).to(dtype) for n in self.hf_names(layer)]
        for rank in range(tp):
            for offsets, data in self.tp_blocks(hf, arch, tp, rank):
                yield rank, offsets, data

    def read_plan(
        self, chunks: list[Region] | None, arch: ModelArch, padded_vocab: int, layer: int | None
    ) -> list[ReadPiece] | None:
        """How to read the HF tensors back piece by piece from the stored ``chunks`` (regions
        of one layer's tensor; ``None`` when they are not per-layer), or ``None``: read the
        whole tensor and call :meth:`to_hf`."""
        return None


@dataclass(frozen=True)
class Replicated(TensorMapping):
    """Every TP rank holds all of it (norms)."""


@dataclass(frozen=True)
class SplitRows(TensorMapping):
    """Split along axis 0 across TP ranks (column-parallel outputs)."""

    def tp_regions(self, shape: Shape, tp: int, rank: int) -> list[Region]:
        return split_regions(shape, 0, tp, rank)


@dataclass(frozen=True)
class SplitCols(TensorMapping):
    """Split along axis 1 across TP ranks (row-parallel inputs)."""

    def tp_regions(self, shape: Shape, tp: int, rank: int) -> list[Region]:
        return split_regions(shape, 1, tp, rank)


@dataclass(frozen=True)
class QKV(SplitRows):
    """HF q, k, v fused into megatron's ``linear_qkv`` interleaved per query group
    (``[q_g; k_g; v_g]`` for each group ``g``); weights, or biases with ``bias=True``."""

    bias: bool = False

    def hf_shapes(self, arch: ModelArch) -> list[Shape]:
        d = dims(arch)
        rest = () if self.bias else (d["hidden"],)
        return [(d["q"], *rest), (d["kv"], *rest), (d["kv"], *rest)]

    def mcore_shape(self, arch: ModelArch, padded_vocab: int) -> Shape:
        shapes = self.hf_shapes(arch)
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def to_mcore(self, hf, arch):
        return fuse_qkv(*hf, arch.num_attention_heads, arch.num_query_groups)

    def to_hf(self, t, arch):
        return split_qkv(t, arch.num_attention_heads, arch.num_query_groups)

    def tp_blocks(self, hf, arch, tp, rank):
        shape = self.mcore_shape(arch, 0)
        ((offsets, sizes),) = self.tp_regions(shape, tp, rank)
        if tp > arch.num_query_groups:
            # TP > query groups (megatron-core all-gathers QKV and each rank keeps its query
            # heads): ranks hold an even row split of the fused tensor, which cuts through a
            # group. Fuse only the one group this rank's rows fall in.
            ranks_per_group = tp // arch.num_query_groups
            g = rank // ranks_per_group
            per_group = arch.num_attention_heads // arch.num_query_groups
            d = arch.kv_channels
            q, k, v = hf
            fused = fuse_qkv(
                q.narrow(0, g * per_group * d, per_group * d),
                k.narrow(0, g * d, d),
                v.narrow(0, g * d, d),
                per_group,
                1,
            )
            start = offsets[0] - g * fused.shape[0]
            return [(offsets, owned_copy(fused.narrow(0, start, sizes[0])))]
        # A TP rank holds whole query groups: fuse just its slices of q, k and v.
        groups = arch.num_query_groups // tp
        per_group = arch.num_attention_heads // arch.num_query_groups
        d = arch.kv_channels
        q, k, v = hf
        q = q.narrow(0, rank * groups * per_group * d, groups * per_group * d)
        k = k.narrow(0, rank * groups * d, groups * d)
        v = v.narrow(0, rank * groups * d, groups * d)
        return [(offsets, fuse_qkv(q, k, v, groups * per_group, groups))]


@dataclass(frozen=True)
class PackedQKV(QKV):
    """One HF tensor holding ``[q; k; v]`` stacked along rows (Baichuan's ``W_pack``) ->
    megatron's ``linear_qkv`` interleaved per query group, and back. The stored blocks are
    :class:`QKV`'s: the HF tensor is cut into q/k/v views (no copy) before fusing."""

    def _split(self, packed: torch.Tensor, arch: ModelArch):
        d = dims(arch)
        return packed.split([d["q"], d["kv"], d["kv"]], dim=0)

    def hf_shapes(self, arch: ModelArch) -> list[Shape]:
        shapes = super().hf_shapes(arch)
        return [(sum(s[0] for s in shapes), *shapes[0][1:])]

    def to_mcore(self, hf, arch):
        (packed,) = hf
        return super().to_mcore(self._split(packed, arch), arch)

    def to_hf(self, t, arch):
        return (torch.cat(super().to_hf(t, arch), dim=0),)

    def tp_blocks(self, hf, arch, tp, rank):
        (packed,) = hf
        return super().tp_blocks(self._split(packed, arch), arch, tp, rank)


@dataclass(frozen=True)
class GateUp(TensorMapping):
    """SwiGLU's ``linear_fc1``: ``[gate; up]`` along axis 0, each half split across TP ranks
    (a rank stores a gate block and an up block)."""

    def hf_shapes(self, arch: ModelArch) -> list[Shape]:
        d = dims(arch)
        return [(d["ffn"], d["hidden"])] * 2

    def mcore_shape(self, arch: ModelArch, padded_vocab: int) -> Shape:
        d = dims(arch)
        return (2 * d["ffn"], d["hidden"])

    def to_mcore(self, hf, arch):
        return fuse_gate_up(*hf)

    def to_hf(self, t, arch):
        return split_gate_up(t)

    def tp_regions(self, shape: Shape, tp: int, rank: int) -> list[Region]:
        half = shape[0] // 2
        size = half // tp
        rest = tuple(shape[1:])
        zeros = (0,) * len(rest)
        return [
            ((rank * size, *zeros), (size, *rest)),
            ((half + rank * size, *zeros), (size, *rest)),
        ]

    def tp_blocks(self, hf, arch, tp, rank):
        half = self.mcore_shape(arch, 0)[0] // 2
        out = []
        for offsets, sizes in self.tp_regions(self.mcore_shape(arch, 0), tp, rank):
            src = hf[offsets[0] // half]
            out.append((offsets, owned_copy(src.narrow(0, offsets[0] % half, sizes[0]))))
        return out

    def read_plan(self, chunks, arch, padded_vocab, layer):
        # Stream gate then up, stored block by block (no assembly copy), when the stored grid
        # splits rows only and no block straddles the gate/up boundary (megatron's at any TP).
        if chunks is None:
            return None
        half = dims(arch)["ffn"]
        for off, size in chunks:
            if any(off[1:]) or off[0] // half != (off[0] + size[0] - 1) // half:
                return None
        names = self.hf_names(layer)
        return [
            (names[which], (off, size), None)
            for which in (0, 1)
            for off, size in sorted(chunks)
            if off[0] // half == which
        ]


@dataclass(frozen=True)
class Vocab(SplitRows):
    """Embedding / output layer: vocabulary rows split across TP ranks, padded with zero rows
    to the checkpoint's padded vocabulary (padding is cut on the way back)."""

    large_blocks = True

    def hf_shapes(self, arch: ModelArch) -> list[Shape]:
        d = dims(arch)
        return [(d["vocab"], d["hidden"])]

    def mcore_shape(self, arch: ModelArch, padded_vocab: int) -> Shape:
        return (padded_vocab, arch.hidden_size)

    def mcore_blocks(self, src, arch, tp, padded_vocab, dtype, layer):
        # Rank block by rank block from the HF rows: only one block is ever in memory.
        (name,) = self.hf_names(layer)
        rows = padded_vocab // tp
        for r in range(tp):
            start = r * rows
            stop = min(start + rows, arch.vocab_size)
            if stop > start:
                have = src.get_rows(name, start, stop).to(dtype)
                data = padded_rows(have, start, rows, arch.vocab_size)
            else:
                data = torch.zeros((rows, arch.hidden_size), dtype=dtype)
            yield r, (start, 0), data

    def read_plan(self, chunks, arch, padded_vocab, layer):
        (name,) = self.hf_names(layer)
        vocab, h = arch.vocab_size, arch.hidden_size
        chunks = sorted(chunks or [((0, 0), (padded_vocab, h))])
        if all(off[1] == 0 and size[1] == h for off, size in chunks):
            # whole stored row blocks, padding rows cut off
            return [
                (name, (off, size), min(size[0], vocab - off[0]))
                for off, size in chunks
                if off[0] < vocab
            ]
        starts = sorted({off[0] for off, _ in chunks} | {0})
        bounds = [s for s in starts if s < vocab] + [vocab]
        return [(name, ((a, 0), (b - a, h)), None) for a, b in zip(bounds, bounds[1:])]


# ---- a family's whole table -------------------------------------------------------------------


@dataclass(frozen=True)
class ModelMapping:
    """A family's tensor table for one architecture, in HF's own parameter order: ``pre``
    (embedding), ``layer`` (per-layer, repeated ``num_layers`` times), ``post`` (final norm,
    output layer)."""

    pre: tuple[TensorMapping, ...]
    layer: tuple[TensorMapping, ...]
    post: tuple[TensorMapping, ...]
    tied: tuple[str, str] | None = None
    """(HF output name, HF embedding name) when the output layer is tied to the embedding: the HF
    folder may carry an identical copy of the embedding under the output name."""
    ignored_hf_suffixes: tuple[str, ...] = ()
    """HF tensors that are derived, not learned (e.g. rotary ``inv_freq`` buffers)."""
    extra_state_modules: tuple[str, ...] = EXTRA_STATE_MODULES
    first_stage: frozenset[str] = field(default_factory=lambda: frozenset({EMBED}))
    """Megatron keys of ``pre``/``post`` stored by the first pipeline stage (else the last)."""

    @property
    def tensors(self) -> tuple[TensorMapping, ...]:
        """Every mapping once."""
        return (*self.pre, *self.layer, *self.post)

    def order(self, num_layers: int) -> list[tuple[TensorMapping, int | None]]:
        """(mapping, layer) in the order both directions stream them: HF's parameter order."""
        out: list[tuple[TensorMapping, int | None]] = [(m, None) for m in self.pre]
        out += [(m, i) for i in range(num_layers) for m in self.layer]
        out += [(m, None) for m in self.post]
        return out

    def stage_of(self, m: TensorMapping, layer: int | None, stages: list[int], pp: int) -> int:
        """Pipeline stage that stores ``m`` (of ``layer``) given each layer's stage."""
        if layer is not None:
            return stages[layer]
        return 0 if m.mcore in self.first_stage else pp - 1

    def get(self, mcore: str) -> TensorMapping:
        """The mapping of a megatron key."""
        for m in self.tensors:
            if m.mcore == mcore:
                return m
        raise KeyError(mcore)


MappingFactory = Callable[[ModelArch], ModelMapping]
