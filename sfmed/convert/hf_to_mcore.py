"""HF Qwen2 folder -> Megatron-LM checkpoint folder (torch_dist), streaming one tensor at a time.

Output layout (see :mod:`sfmed.core.megatron_layout`)::

    <dst>/latest_checkpointed_iteration.txt   "release"
    <dst>/release/                            torch_dist: metadata.json, common.pt, .metadata,
                                              __<rank>_0.distcp (rank = pp_rank * tp + tp_rank)
    <dst>/release/sfmed.json                  arch, padded_vocab_size, tp, pp, origin
    <dst>/hf/                                 config.json, generation config, tokenizer files

The chunk grid is exactly the one megatron-core's ``dist_checkpointing.save`` writes for a
GPTModel at the requested TP×PP, and the keys are ``GPTModel.sharded_state_dict()``'s, so
``dist_checkpointing.load`` restores the weights into a GPTModel at any TP/PP. Everything is
written into a temporary sibling folder that is renamed onto ``dst`` at the very end.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

import sfmed
from sfmed.convert import keymap as km
from sfmed.convert import tensors as T
from sfmed.convert.errors import HFCheckpointError
from sfmed.convert.hf_io import HFWeights, copy_sidecar, dtype_name
from sfmed.convert.report import ConversionSummary, progress_bar
from sfmed.core import megatron_layout as layout
from sfmed.core.atomic import atomic_dir, check_destination
from sfmed.core.torch_dist import TorchDistWriter
from sfmed.models.qwen2 import (
    VOCAB_PAD_TP,
    Qwen2Arch,
    arch_from_hf_config,
    arch_to_dict,
    checkpoint_vocab_size,
    validate_parallel,
)

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version


def layer_stages(num_layers: int, pp: int, layers_per_stage: list[int] | None = None) -> list[int]:
    """Pipeline stage of every layer (even split, or the given uneven layout)."""
    counts = list(layers_per_stage) if layers_per_stage else [num_layers // pp] * pp
    return [stage for stage, n in enumerate(counts) for _ in range(n)]


def expected_hf_tensors(arch: Qwen2Arch) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of ``arch`` with its shape, in conversion order."""
    out: dict[str, tuple[int, ...]] = {}
    for m, layer in km.conversion_order(arch):
        out.update(zip(m.hf_names(layer), T.hf_shapes(m, arch)))
    return out


def convert_hf_to_mcore(
    src: str | Path,
    dst: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    layers_per_stage: list[int] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    make_vocab_size_divisible_by: int = 128,
    vocab_pad_tp: int = VOCAB_PAD_TP,
    progress: bool = True,
) -> ConversionSummary:
    """Convert the HF Qwen2 folder ``src`` into a Megatron checkpoint folder ``dst``.

    Everything a user can get wrong (config, shards, dtypes, TP/PP, an existing ``dst``) is
    checked before the first byte is written. ``dtype=None`` keeps the HF dtype, which makes
    the conversion exact. Returns a :class:`ConversionSummary`.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise HFCheckpointError(f"src={src} is not a folder; point to an HF Qwen2 model folder")
    arch = arch_from_hf_config(src)
    validate_parallel(arch, tp, pp, layers_per_stage)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise HFCheckpointError(f"dst={dst} lies inside src={src}; choose a folder outside it")
    check_destination(dst, overwrite)
    optional = [km.HF_LM_HEAD] if arch.tie_word_embeddings else []
    weights = HFWeights(src, expected_hf_tensors(arch), optional, km.HF_IGNORED_SUFFIXES)
    if weights.extra:  # a tied model saved with a copy of its embedding as lm_head
        if not torch.equal(weights.get(km.HF_LM_HEAD), weights.get(km.HF_EMBED)):
            raise HFCheckpointError(
                "config.json has tie_word_embeddings=true but lm_head.weight differs from "
                "model.embed_tokens.weight; set tie_word_embeddings=false to keep both"
            )
        log.warning("ignoring lm_head.weight: tied to model.embed_tokens.weight (identical)")
    out_dtype = dtype or weights.dtype
    padded = checkpoint_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by, vocab_pad_tp)
    stages = layer_stages(arch.num_layers, pp, layers_per_stage)
    log.info(
        "hf->mcore %s: %d layers, hidden %d, vocab %d (padded %d), %s, tp=%d pp=%d",
        src,
        arch.num_layers,
        arch.hidden_size,
        arch.vocab_size,
        padded,
        dtype_name(out_dtype),
        tp,
        pp,
    )

    n_tensors = 0
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        ckpt = tmp / layout.RELEASE
        writer = TorchDistWriter(ckpt)
        try:
            with progress_bar(weights.total_bytes, "hf->mcore", progress) as bar:
                for m, layer in km.conversion_order(arch):
                    stage = _stage_of(m, layer, stages, pp)
                    if m.kind == "vocab":
                        _write_vocab(writer, weights, m, arch, padded, tp, stage, out_dtype)
                    else:
                        _write_layer_tensor(writer, weights, m, layer, arch, tp, stage, out_dtype)
                    n_tensors += len(m.hf)
                    bar.update(sum(_nbytes(s, weights.dtype) for s in T.hf_shapes(m, arch)))
            for layer in range(arch.num_layers):
                for module in km.EXTRA_STATE_MODULES:
                    key = km.extra_state_key(module, layer, arch.num_layers)
                    writer.add_object(key, None, rank=stages[layer] * tp)
            writer.finish(common={"checkpoint_version": CHECKPOINT_VERSION, "iteration": 0})
        except BaseException:
            writer.abort()
            raise
        finally:
            weights.close()
        layout.write_meta(
            ckpt,
            {
                "arch": arch_to_dict(arch),
                "padded_vocab_size": padded,
                "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
                "vocab_pad_tp": vocab_pad_tp,
                "tp": tp,
                "pp": pp,
                "layers_per_stage": list(layers_per_stage) if layers_per_stage else None,
                "dtype": dtype_name(out_dtype),
                "format": "torch_dist",
                "iteration": layout.RELEASE,
                "origin": {
                    "kind": "hf",
                    "path": str(src.resolve()),
                    "converter": f"sfmed {sfmed.__version__}",
                },
            },
        )
        copied = copy_sidecar(src, tmp / layout.HF_SIDECAR)
        log.info("kept HF files for the way back: %s", ", ".join(copied))
        layout.write_tracker(tmp, layout.RELEASE)  # the tracker marks the folder complete: last
        n_files = len(list(ckpt.glob("*.distcp")))
    summary = ConversionSummary(
        "hf->mcore",
        str(src),
        str(dst),
        n_tensors,
        writer.bytes_written,
        time.perf_counter() - t0,
        n_files,
    )
    log.info(summary.line())
    return summary


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def _stage_of(m: km.TensorMap, layer: int | None, stages: list[int], pp: int) -> int:
    if layer is not None:
        return stages[layer]
    return 0 if m.mcore == km.EMBED else pp - 1


def _write_vocab(writer, weights, m, arch, padded, tp, stage, dtype) -> None:
    """Vocabulary tensors go rank block by rank block: only one block is ever in memory."""
    (name,) = m.hf
    rows = padded // tp
    for r in range(tp):
        writer.wait()  # a vocabulary block can be ~0.5 GB: never build one while one is queued
        start = r * rows
        stop = min(start + rows, arch.vocab_size)
        have = weights.get_rows(name, start, stop) if stop > start else None
        if have is None:
            block = torch.zeros((rows, arch.hidden_size), dtype=dtype)
        else:
            block = T.padded_rows(have.to(dtype), start, rows, arch.vocab_size)
        writer.add_chunk(m.mcore, (padded, arch.hidden_size), (start, 0), block, stage * tp + r)


def _write_layer_tensor(writer, weights, m, layer, arch, tp, stage, dtype) -> None:
    hf = [weights.get(n).to(dtype) for n in m.hf_names(layer)]
    shape = T.mcore_shape(m, arch, 0)
    for r in range(tp):
        for offsets, data in T.tp_blocks(m, hf, arch, tp, r):
            if m.layered:
                writer.add_chunk(
                    m.mcore,
                    (arch.num_layers, *shape),
                    (layer, *offsets),
                    data.unsqueeze(0),
                    stage * tp + r,
                )
            else:
                writer.add_chunk(m.mcore, shape, offsets, data, stage * tp + r)
