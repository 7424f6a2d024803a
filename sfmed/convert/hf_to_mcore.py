"""HF model folder -> Megatron-LM checkpoint folder (torch_dist), streaming one tensor at a time.

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

Generic over model families: the family's tensor mapping (:mod:`sfmed.models.mapping`) says
which HF tensors make which stored blocks; this module only streams them to the writer.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

import sfmed
from sfmed.convert.hf_io import HFWeights, copy_sidecar
from sfmed.convert.keymap import model_mapping
from sfmed.convert.report import ConversionSummary, progress_bar
from sfmed.core import megatron_layout as layout
from sfmed.core.atomic import atomic_dir, check_destination
from sfmed.core.dtypes import dtype_name
from sfmed.core.errors import HFCheckpointError
from sfmed.core.parallel import validate_parallel
from sfmed.core.torch_dist import TorchDistWriter
from sfmed.models.arch import VOCAB_PAD_TP, ModelArch, arch_to_dict, checkpoint_vocab_size
from sfmed.models.family import arch_from_hf_config, family_for
from sfmed.models.mapping import TensorMapping, extra_state_key

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version


def layer_stages(num_layers: int, pp: int, layers_per_stage: list[int] | None = None) -> list[int]:
    """Pipeline stage of every layer (even split, or the given uneven layout)."""
    counts = list(layers_per_stage) if layers_per_stage else [num_layers // pp] * pp
    return [stage for stage, n in enumerate(counts) for _ in range(n)]


def expected_hf_tensors(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of ``arch`` with its shape, in conversion order."""
    out: dict[str, tuple[int, ...]] = {}
    for m, layer in model_mapping(arch).order(arch.num_layers):
        out.update(zip(m.hf_names(layer), m.hf_shapes(arch)))
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
    """Convert the HF model folder ``src`` into a Megatron checkpoint folder ``dst``.

    Everything a user can get wrong (config, shards, dtypes, TP/PP, an existing ``dst``) is
    checked before the first byte is written. ``dtype=None`` keeps the HF dtype, which makes
    the conversion exact. Returns a :class:`ConversionSummary`.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise HFCheckpointError(f"src={src} is not a folder; point to an HF model folder")
    arch = arch_from_hf_config(src)
    mapping = model_mapping(arch)
    validate_parallel(arch, tp, pp, layers_per_stage)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise HFCheckpointError(f"dst={dst} lies inside src={src}; choose a folder outside it")
    check_destination(dst, overwrite)
    optional = [mapping.tied[0]] if mapping.tied else []
    weights = HFWeights(
        src,
        expected_hf_tensors(arch),
        optional,
        mapping.ignored_hf_suffixes,
        model_class=family_for(arch).hf_architecture,
    )
    if weights.extra:  # a tied model saved with a copy of its embedding as its output layer
        head, embed = mapping.tied
        if not torch.equal(weights.get(head), weights.get(embed)):
            raise HFCheckpointError(
                f"config.json has tie_word_embeddings=true but {head} differs from {embed}; "
                "set tie_word_embeddings=false to keep both"
            )
        log.warning("ignoring %s: tied to %s (identical)", head, embed)
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
                for m, layer in mapping.order(arch.num_layers):
                    stage = mapping.stage_of(m, layer, stages, pp)
                    _write_tensor(writer, weights, m, layer, arch, padded, tp, stage, out_dtype)
                    n_tensors += len(m.hf)
                    bar.update(sum(_nbytes(s, weights.dtype) for s in m.hf_shapes(arch)))
            for layer in range(arch.num_layers):
                for module in mapping.extra_state_modules:
                    key = extra_state_key(module, layer, arch.num_layers)
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
                # What the model came in with: export (to=hf) writes it back by default.
                "source_dtype": dtype_name(weights.dtype),
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
        dtype_name(out_dtype),
    )
    log.info(summary.line())
    return summary


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def _write_tensor(
    writer: TorchDistWriter,
    weights: HFWeights,
    m: TensorMapping,
    layer: int | None,
    arch: ModelArch,
    padded: int,
    tp: int,
    stage: int,
    dtype: torch.dtype,
) -> None:
    """Stream every stored block of ``m`` (of ``layer``) from ``weights`` to ``writer``."""
    shape = m.mcore_shape(arch, padded)
    blocks = m.mcore_blocks(weights, arch, tp, padded, dtype, layer)
    while True:
        if m.large_blocks:  # e.g. a ~0.5 GB vocabulary block: never build one while one is queued
            writer.wait()
        item = next(blocks, None)
        if item is None:
            return
        rank, offsets, data = item
        if m.layered:
            writer.add_chunk(
                m.mcore,
                (arch.num_layers, *shape),
                (layer, *offsets),
                data.unsqueeze(0),
                stage * tp + rank,
            )
        else:
            writer.add_chunk(m.mcore, shape, offsets, data, stage * tp + rank)
