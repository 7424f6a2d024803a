"""Megatron checkpoint (torch_dist, any TP/PP, converted or trained) -> HF model folder.

Mirror of :mod:`sfmed.convert.hf_to_mcore`: the same key map and tensor functions, run backwards,
one tensor (one layer's slice of a stacked tensor, or one stored row block of the vocabulary) at a
time. Only the model's tensors are read: optimizer state, RNG and other top-level entries of a
trained checkpoint (``model0``/``model1`` of virtual pipeline stages included, whose tensors share
the same global keys) are ignored. Vocabulary padding is stripped; tied embeddings stay tied (no
output-layer tensor). Generic over model families, like the other direction.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import torch

from sfmed.convert.hf_io import SafetensorsWriter, copy_sidecar, sidecar_files
from sfmed.convert.keymap import model_mapping
from sfmed.convert.report import ConversionSummary, progress_bar
from sfmed.core import megatron_layout as layout
from sfmed.core.atomic import atomic_dir, check_destination
from sfmed.core.background import prefetched
from sfmed.core.dtypes import dtype_name, torch_dtype
from sfmed.core.errors import CheckpointFormatError, CheckpointMismatchError, ConfigError
from sfmed.core.torch_dist import TorchDistReader
from sfmed.core.units import parse_size
from sfmed.models.arch import ModelArch, arch_from_dict
from sfmed.models.family import arch_from_hf_config, family_for
from sfmed.models.mapping import EMBED, OUTPUT, TensorMapping

log = logging.getLogger(__name__)


def find_hf_sidecar(ckpt_dir: Path, hf_config: str | Path | None = None) -> Path | None:
    """The folder with the HF config/tokenizer for a checkpoint folder: ``hf_config`` when given,
    else ``<root>/hf`` beside the iteration folders (or ``hf`` inside it)."""
    if hf_config is not None:
        p = Path(hf_config)
        p = p.parent if p.is_file() else p
        if not (p / "config.json").is_file():
            raise ConfigError(f"hf_config={hf_config} holds no config.json")
        return p
    for cand in (ckpt_dir.parent / layout.HF_SIDECAR, ckpt_dir / layout.HF_SIDECAR):
        if (cand / "config.json").is_file():
            return cand
    return None


def checkpoint_arch(ckpt: str | Path, hf_config: str | Path | None = None) -> tuple[ModelArch, int]:
    """(architecture, padded vocabulary size) of a checkpoint (root or iteration folder).

    Read from ``sfmed.json``; for checkpoints without it (e.g. Megatron-LM's) from the HF
    ``config.json`` beside it or ``hf_config``, and the stored embedding's row count.
    """
    ckpt_dir = layout.resolve_checkpoint(ckpt)
    meta = layout.read_meta(ckpt_dir)
    if meta.get("arch"):
        arch = arch_from_dict(meta["arch"])
    else:
        sidecar = find_hf_sidecar(ckpt_dir, hf_config)
        if sidecar is None:
            raise CheckpointFormatError(
                f"{ckpt_dir} has no {layout.META} and no HF config.json beside it "
                f"({ckpt_dir.parent / layout.HF_SIDECAR}); pass hf_config=<HF folder of the model>"
            )
        arch = arch_from_hf_config(sidecar)
    padded = meta.get("padded_vocab_size")
    if padded is None:
        padded = TorchDistReader(ckpt_dir).shape(EMBED)[0]
    return arch, int(padded)


def expected_mcore_tensors(arch: ModelArch, padded: int) -> dict[str, tuple[int, ...]]:
    """Global shape of every checkpoint tensor of ``arch``."""
    out = {}
    for m in model_mapping(arch).tensors:
        shape = m.mcore_shape(arch, padded)
        out[m.mcore] = (arch.num_layers, *shape) if m.layered else shape
    return out


def check_checkpoint_tensors(reader: TorchDistReader, arch: ModelArch, padded: int) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first tensor the checkpoint lacks or
    stores in another shape than ``arch`` implies; check the data files are all there."""
    expected = expected_mcore_tensors(arch, padded)
    for key, shape in expected.items():
        if not reader.has(key):
            hint = " (the model is untied: tie_word_embeddings=false)" if key == OUTPUT else ""
            raise CheckpointMismatchError(f"{reader.dir} lacks tensor {key}{hint}")
        got = reader.shape(key)
        if got != shape:
            raise CheckpointMismatchError(
                f"{reader.dir}: {key} has shape {list(got)} but the model description "
                f"(sfmed.json / config.json) implies {list(shape)}"
            )
    reader.check_files(list(expected))


def convert_mcore_to_hf(
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    hf_config: str | Path | None = None,
    progress: bool = True,
) -> ConversionSummary:
    """Convert the Megatron checkpoint ``src`` (root with tracker, or an iter_*/release folder)
    into an HF folder ``dst`` that ``transformers`` loads as the family's causal-LM class.

    ``dtype=None`` writes the dtype the model came in with (``source_dtype`` in ``sfmed.json``:
    recorded at conversion and carried through training — a bf16 model trained in fp32 on CPU
    exports as bf16), else the stored dtype. ``hf_config`` supplies config.json and
    tokenizer files when the checkpoint carries none. Returns a :class:`ConversionSummary`.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    ckpt_dir = layout.resolve_checkpoint(src)
    check_destination(dst, overwrite)
    shard_bytes = parse_size(max_shard_size)
    reader = TorchDistReader(ckpt_dir)
    arch, padded = checkpoint_arch(ckpt_dir, hf_config)
    mapping = model_mapping(arch)
    check_checkpoint_tensors(reader, arch, padded)
    sidecar = find_hf_sidecar(ckpt_dir, hf_config)
    stored = Counter(reader.dtype(m.mcore) for m in mapping.tensors)
    meta = layout.read_meta(ckpt_dir)
    source = meta.get("source_dtype") or meta.get("dtype")
    out_dtype = dtype or (torch_dtype(source) if source else stored.most_common(1)[0][0])
    if dtype is None and source and {out_dtype} != set(stored):
        log.info(
            "writing %s, the dtype the model came in with (stored: %s); dtype= chooses another",
            dtype_name(out_dtype),
            ", ".join(sorted(dtype_name(d) for d in stored)),
        )
    elif len(stored) > 1 and dtype is None:
        log.warning("checkpoint mixes dtypes %s; writing %s", dict(stored), out_dtype)
    specs = [
        (name, shape, out_dtype)
        for m, layer in mapping.order(arch.num_layers)
        for name, shape in zip(m.hf_names(layer), m.hf_shapes(arch))
    ]
    log.info(
        "mcore->hf %s: %d layers, hidden %d, vocab %d (stored %d), %s",
        ckpt_dir,
        arch.num_layers,
        arch.hidden_size,
        arch.vocab_size,
        padded,
        dtype_name(out_dtype),
    )
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        writer = SafetensorsWriter(tmp, specs, shard_bytes)
        try:
            tensors = (
                (name, t.to(out_dtype))
                for m, layer in mapping.order(arch.num_layers)
                for name, t in _hf_tensors(reader, m, layer, arch, padded)
            )
            with progress_bar(writer.total_bytes, "mcore->hf", progress) as bar:
                for name, t in prefetched(tensors):  # reading runs ahead of the writes
                    writer.write(name, t)
                    bar.update(t.numel() * out_dtype.itemsize)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        _write_hf_side_files(tmp, arch, sidecar, out_dtype, final=dst)
        n_files = len(writer.shard_names)
    summary = ConversionSummary(
        "mcore->hf",
        str(ckpt_dir),
        str(dst),
        len(specs),
        writer.total_bytes,
        time.perf_counter() - t0,
        n_files,
        dtype_name(out_dtype),
    )
    log.info(summary.line())
    return summary


def _hf_tensors(
    reader: TorchDistReader, m: TensorMapping, layer: int | None, arch: ModelArch, padded: int
):
    """Yield (HF name, tensor or block of it) for one mapping and layer: piece by piece when the
    mapping has a read plan for the stored chunk grid, else the whole tensor through ``to_hf``."""
    shape = m.mcore_shape(arch, padded)
    plan = m.read_plan(_layer_chunks(reader, m, layer), arch, padded, layer)
    if plan is not None:
        for name, (off, size), rows in plan:
            if m.layered:
                t = reader.read(m.mcore, (layer, *off), (1, *size))[0]
            else:
                t = reader.read(m.mcore, off, size)
            yield name, t if rows is None else t[:rows]
        return
    if m.layered:
        t = reader.read(m.mcore, (layer, *[0] * len(shape)), (1, *shape))[0]
    else:
        t = reader.read(m.mcore, (0,) * len(shape), shape)
    yield from zip(m.hf_names(layer), m.to_hf(t, arch))


def _layer_chunks(reader: TorchDistReader, m: TensorMapping, layer: int | None):
    """The stored chunks of ``m`` as regions of one layer's tensor; None when a chunk holds
    several layers (then there is no per-layer grid to stream by)."""
    chunks = reader.chunks(m.mcore)
    if not m.layered:
        return list(chunks)
    out = []
    for off, size in chunks:
        if off[0] <= layer < off[0] + size[0]:
            if size[0] != 1:
                return None
            out.append((tuple(off[1:]), tuple(size[1:])))
    return out


def _write_hf_side_files(
    out: Path, arch: ModelArch, sidecar: Path | None, dtype: torch.dtype, final: Path
) -> None:
    """config.json (the original one, dtype updated if cast), generation config, tokenizer."""
    if sidecar is not None:
        copy_sidecar(sidecar, out)
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        key = "torch_dtype" if "torch_dtype" in cfg else "dtype"
        if cfg.get(key) != dtype_name(dtype):
            cfg[key] = dtype_name(dtype)
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    else:
        log.warning(
            "no HF config/tokenizer files travel with this checkpoint: writing a config.json from "
            "its architecture; add tokenizer files (or pass hf_config=<HF folder>)"
        )
        (out / "config.json").write_text(
            json.dumps(
                family_for(arch).hf_config_dict(arch, dtype_name(dtype)), indent=2, sort_keys=True
            )
            + "\n"
        )
    if not (out / "generation_config.json").is_file():
        from transformers import GenerationConfig

        cfg = family_for(arch).hf_config_class().from_pretrained(str(out))
        GenerationConfig.from_model_config(cfg).save_pretrained(str(out))
    has_tokenizer = any(p.name.startswith("tokenizer") for p in sidecar_files(out))
    if not has_tokenizer:
        log.warning("%s gets no tokenizer files; copy them from the original HF model", final)
