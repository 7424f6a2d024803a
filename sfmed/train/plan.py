"""Check a pretraining config against the world it will run in, before any work starts.

:func:`make_plan` resolves everything that can be decided without a process group — device,
precision, layer spec, data-parallel size, micro-batches, vocabulary padding, which checkpoint to
resume from or initialise from, the data blend — and raises :class:`ConfigError` naming the value
and the fix for every combination that cannot work. It reads only small files (checkpoint
metadata, dataset headers); the result is the :class:`TrainPlan` the trainer follows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sfmed.config.pretrain import PretrainConfig
from sfmed.core import megatron_layout as layout
from sfmed.core.errors import ConfigError
from sfmed.models.qwen2 import Qwen2Arch, arch_to_dict, checkpoint_vocab_size
from sfmed.models.qwen2 import validate_parallel as validate_model_split
from sfmed.models.specs import flash_attn_available, te_available

log = logging.getLogger(__name__)

# Fields whose mismatch makes a checkpoint unusable for the configured model (shape or maths).
_ARCH_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "tie_word_embeddings",
    "rms_norm_eps",
    "rope_theta",
)
_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8": torch.bfloat16,
}


@dataclass
class TrainPlan:
    """Everything the trainer needs that follows from the config and the world size."""

    arch: Qwen2Arch
    world_size: int
    dp: int
    num_microbatches: int
    device: str
    precision: str
    impl: str
    attention: str
    padded_vocab_size: int
    sequence_parallel: bool
    run_dir: Path
    resume_from: Path | None = None
    init_from: Path | None = None
    ckpt_meta: dict = field(default_factory=dict)
    reshard: bool = False
    data_prefixes: list[str] = field(default_factory=list)
    data_weights: list[float] | None = None
    eod_id: int | None = None
    decay_steps: int = 0
    vpp: int | None = None

    @property
    def params_dtype(self) -> torch.dtype:
        """dtype of the model parameters (optimizer master weights are always fp32)."""
        return _DTYPES[self.precision]

    def describe(self) -> str:
        """One-line summary for the log."""
        src = (
            f"resume {self.resume_from}"
            if self.resume_from
            else f"init {self.init_from}"
            if self.init_from
            else "random init"
        )
        return (
            f"world={self.world_size} dp={self.dp} micro-batches={self.num_microbatches} "
            f"device={self.device} precision={self.precision} impl={self.impl} "
            f"attention={self.attention} padded_vocab={self.padded_vocab_size} "
            f"sp={self.sequence_parallel} {src}"
        )


def _world_size(world_size: int | None) -> int:
    return int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", "1"))


def _resolve_device(device: str) -> str:
    from sfmed.core.distributed import resolve_device

    try:
        return resolve_device(device)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None


def _resolve_impl(cfg: PretrainConfig, device: str, precision: str) -> tuple[str, str]:
    impl = cfg.model.transformer_impl
    if impl == "auto":
        impl = "transformer_engine" if device == "cuda" and te_available() else "local"
    if impl == "transformer_engine":
        if device != "cuda":
            raise ConfigError(
                "model.transformer_impl=transformer_engine needs CUDA; with device=cpu use "
                "model.transformer_impl=local"
            )
        if not te_available():
            raise ConfigError(
                "model.transformer_impl=transformer_engine but Transformer Engine is not "
                "installed; pip install 'transformer-engine[pytorch]' or use transformer_impl=local"
            )
        return impl, "te"
    attention = cfg.model.attention_backend
    if attention == "auto":
        fa = device == "cuda" and precision in ("bf16", "fp16") and flash_attn_available()
        attention = "flash" if fa else "sdpa"
    if attention == "flash":
        if not flash_attn_available():
            raise ConfigError(
                "model.attention_backend=flash but the flash-attn package is not installed; "
                "pip install flash-attn, or use attention_backend=sdpa"
            )
        if device != "cuda" or precision not in ("bf16", "fp16"):
            raise ConfigError(
                "model.attention_backend=flash needs CUDA and bf16/fp16 (train.precision); "
                "use attention_backend=sdpa"
            )
    return impl, attention


def _resolve_precision(cfg: PretrainConfig, device: str) -> str:
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device == "cuda" else "fp32"
    if p == "fp8":
        if device != "cuda":
            raise ConfigError("train.precision=fp8 needs CUDA GPUs; use bf16 or fp32 on CPU")
        if not te_available():
            raise ConfigError(
                "train.precision=fp8 needs Transformer Engine (pip install "
                "'transformer-engine[pytorch]'); use train.precision=bf16 without it"
            )
        major, minor = torch.cuda.get_device_capability()
        cc = 10 * major + minor
        if cc < 89:
            raise ConfigError(
                f"train.precision=fp8 needs an Ada/Hopper/Blackwell GPU (compute capability "
                f"{major}.{minor} here); use train.precision=bf16"
            )
        if cfg.train.fp8_recipe in ("tensorwise", "blockwise") and cc < 90:
            raise ConfigError(
                f"train.fp8_recipe={cfg.train.fp8_recipe} needs Hopper or newer; use "
                "fp8_recipe=delayed on Ada"
            )
        if cfg.train.fp8_recipe == "mxfp8" and cc < 100:
            raise ConfigError(
                "train.fp8_recipe=mxfp8 needs Blackwell (compute capability 10+); use "
                "fp8_recipe=tensorwise or blockwise on Hopper"
            )
    return p


def _check_arch_matches(arch: Qwen2Arch, meta: dict, where: Path, what: str) -> None:
    ckpt_arch = meta.get("arch")
    if not ckpt_arch:
        return
    mine = arch_to_dict(arch)
    diff = [
        f"{k}: checkpoint {ckpt_arch.get(k)!r} vs model {mine.get(k)!r}"
        for k in _ARCH_FIELDS
        if k in ckpt_arch and ckpt_arch.get(k) != mine.get(k)
    ]
    if diff:
        raise ConfigError(
            f"{what}={where} holds a model of a different shape than model="
            f"{arch.num_layers}L/{arch.hidden_size}h:\n  "
            + "\n  ".join(diff)
            + "\nchoose the model group that matches the checkpoint (e.g. model=qwen2_7b), or "
            "model.hf_config=<the HF folder it was converted from>"
        )


def _find_checkpoints(cfg: PretrainConfig, run_dir: Path) -> tuple[Path | None, Path | None]:
    """(resume_from, init_from) iteration folders."""
    has_own = (run_dir / layout.TRACKER).is_file()
    resume_from = None
    if cfg.resume == "auto":
        resume_from = layout.resolve_checkpoint(run_dir) if has_own else None
    elif cfg.resume == "never":
        if has_own:
            raise ConfigError(
                f"resume=never but {run_dir} already holds checkpoints "
                f"({layout.TRACKER} names {layout.read_tracker(run_dir)}); use resume=auto to "
                "continue that run, or choose another run_name / ckpt_dir"
            )
    else:
        try:
            resume_from = layout.resolve_checkpoint(cfg.resume)
        except layout.CheckpointNotFoundError as e:
            raise ConfigError(f"resume={cfg.resume}: {e}") from None
    init_from = None
    if cfg.init_from and resume_from is None:
        try:
            init_from = layout.resolve_checkpoint(cfg.init_from)
        except layout.CheckpointNotFoundError as e:
            raise ConfigError(
                f"init_from={cfg.init_from}: {e}. Convert an HF model first: python "
                "launch/convert.py to=mcore src=<hf dir> dst=<mcore dir>"
            ) from None
    return resume_from, init_from


def _resolve_data(cfg: PretrainConfig) -> tuple[list[str], list[float] | None, int | None]:
    d = cfg.data
    if d.prefix is None and not d.blend:
        raise ConfigError(
            "no training data: set data.prefix=<path without .bin/.idx> or data.blend="
            "[{prefix: ..., weight: ...}, ...] (make indexed datasets with launch/preprocess.py)"
        )
    if d.prefix is not None:
        prefix = str(d.prefix)
        if prefix.endswith((".bin", ".idx")):
            raise ConfigError(
                f"data.prefix={prefix} ends in {prefix[-4:]}; give the prefix without the extension"
            )
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not Path(p).is_file()]
        if missing:
            raise ConfigError(
                f"data.prefix={prefix}: {' and '.join(missing)} not found; fix the path or create "
                "the dataset with python launch/preprocess.py"
            )
        prefixes, weights = [os.path.abspath(prefix)], None
    else:
        from sfmed.data.blend import BlendError, resolve_blend

        try:
            prefixes, weights = resolve_blend(
                [dict(e) for e in d.blend],
                tokenizer=d.tokenizer,
                groups=dict(d.groups) if d.groups else None,
                require_metadata=d.require_metadata,
            )
        except BlendError as e:
            raise ConfigError(f"data.blend: {e}") from None
    eod = d.eod_id
    if eod is None:
        from sfmed.data.metadata import read_sidecar

        try:
            meta = read_sidecar(prefixes[0]) or {}
        except ValueError:
            meta = {}
        eod = (meta.get("tokenizer") or {}).get("eod_id")
    if eod is None and d.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(d.tokenizer)
        eod = (
            tok.convert_tokens_to_ids("<|endoftext|>")
            if "<|endoftext|>" in tok.get_vocab()
            else tok.eos_token_id
        )
    if eod is None and (d.reset_position_ids or d.eod_mask_loss):
        raise ConfigError(
            "data.reset_position_ids / data.eod_mask_loss need the end-of-document id: set "
            "data.eod_id=<id> or data.tokenizer=<tokenizer folder>"
        )
    return prefixes, weights, eod


def make_plan(cfg: PretrainConfig, world_size: int | None = None) -> TrainPlan:
    """Validate ``cfg`` for ``world_size`` processes (default: $WORLD_SIZE) and resolve it."""
    p, t = cfg.parallel, cfg.train
    world = _world_size(world_size)
    arch = cfg.model.arch()
    validate_model_split(arch, p.tp, p.pp)  # before the world size: the more useful message
    if world % p.model_parallel_size:
        raise ConfigError(
            f"world size {world} is not divisible by parallel.tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = "
            f"{p.model_parallel_size}; launch a multiple of {p.model_parallel_size} processes "
            "(torchrun --nproc_per_node) or change the parallel sizes"
        )
    dp = world // p.model_parallel_size
    vpp = p.vpp if p.vpp and p.vpp > 1 else None
    if vpp and arch.num_layers % (p.pp * vpp):
        raise ConfigError(
            f"parallel.pp*vpp = {p.pp}*{vpp} does not divide num_layers={arch.num_layers}; "
            "choose vpp so that every virtual stage gets the same number of layers"
        )
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"micro_batch_size × data-parallel size = {t.micro_batch_size} × {dp} = "
            f"{t.micro_batch_size * dp}; use a multiple of {t.micro_batch_size * dp}"
        )
    nmb = t.global_batch_size // (t.micro_batch_size * dp)
    if vpp and nmb % p.pp:
        raise ConfigError(
            f"parallel.vpp={vpp}: the interleaved schedule needs the number of micro-batches "
            f"({nmb} = global_batch_size / (micro_batch_size × dp)) to be a multiple of "
            f"parallel.pp={p.pp}; raise train.global_batch_size"
        )
    seq = cfg.data.seq_length
    sp = p.sequence_parallel
    if sp and p.tp == 1:
        log.warning("parallel.sequence_parallel=true has no effect with tp=1; turning it off")
        sp = False
    if sp and seq % p.tp:
        raise ConfigError(
            f"data.seq_length={seq} is not divisible by parallel.tp={p.tp} "
            "(sequence parallelism splits the sequence over TP ranks)"
        )
    device = _resolve_device(cfg.device)
    precision = _resolve_precision(cfg, device)
    impl, attention = _resolve_impl(cfg, device, precision)
    if p.cp > 1:
        if impl != "transformer_engine":
            raise ConfigError(
                f"parallel.cp={p.cp} needs Transformer Engine attention "
                "(model.transformer_impl=transformer_engine); set parallel.cp=1"
            )
        if seq % (2 * p.cp):
            raise ConfigError(f"data.seq_length={seq} must be divisible by 2 × parallel.cp")
    if precision == "fp8" and impl != "transformer_engine":
        raise ConfigError("train.precision=fp8 needs model.transformer_impl=transformer_engine")
    if seq > arch.max_position_embeddings:
        log.warning(
            "data.seq_length=%d exceeds max_position_embeddings=%d of the model",
            seq,
            arch.max_position_embeddings,
        )
    decay_steps = cfg.optim.decay_steps or t.steps
    if cfg.optim.warmup_steps >= decay_steps:
        raise ConfigError(
            f"optim.warmup_steps={cfg.optim.warmup_steps} must be smaller than the decay "
            f"horizon optim.decay_steps={decay_steps} (default: train.steps)"
        )
    if t.eval_interval and float(str(cfg.data.split).replace("/", ",").split(",")[1]) == 0:
        raise ConfigError(
            f"train.eval_interval={t.eval_interval} but data.split={cfg.data.split!r} has no "
            "validation part; use e.g. data.split=98,2,0 or train.eval_interval=0"
        )

    run_dir = Path(cfg.ckpt_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"ckpt_dir={run_dir} exists and is not a folder")
    resume_from, init_from = _find_checkpoints(cfg, run_dir)
    src = resume_from or init_from
    meta = layout.read_meta(src) if src else {}
    if src is not None:
        _check_arch_matches(arch, meta, src, "resume" if resume_from else "init_from")
    # A loaded checkpoint's padding wins (the embedding keeps its shape); a fresh run pads as
    # the conversion does, so its checkpoints load at every TP up to 8.
    padded = meta.get("padded_vocab_size") or checkpoint_vocab_size(
        arch.vocab_size, p.tp, cfg.model.make_vocab_size_divisible_by
    )
    if padded % p.tp:
        raise ConfigError(
            f"the checkpoint's padded vocabulary ({padded}) is not divisible by parallel.tp="
            f"{p.tp}; choose a tp that divides {padded}"
        )
    reshard = bool(src) and (meta.get("tp"), meta.get("pp")) not in ((p.tp, p.pp), (None, None))
    if (
        resume_from is not None
        and meta.get("distrib_optim_sharding_type") == "dp_reshardable"
        and reshard
    ):
        raise ConfigError(
            f"{resume_from} was saved with train.optim_ckpt_format=dp_reshardable at "
            f"tp={meta.get('tp')} pp={meta.get('pp')}; its optimizer state cannot be resumed at "
            f"tp={p.tp} pp={p.pp}. Resume with the original tp/pp, or start a new run with "
            "init_from=<that checkpoint> (weights only)"
        )
    prefixes, weights, eod = _resolve_data(cfg)
    plan = TrainPlan(
        arch=arch,
        world_size=world,
        dp=dp,
        num_microbatches=nmb,
        device=device,
        precision=precision,
        impl=impl,
        attention=attention,
        padded_vocab_size=int(padded),
        sequence_parallel=sp,
        run_dir=run_dir,
        resume_from=resume_from,
        init_from=init_from,
        ckpt_meta=meta,
        reshard=reshard,
        data_prefixes=prefixes,
        data_weights=weights,
        eod_id=eod,
        decay_steps=decay_steps,
        vpp=vpp,
    )
    return plan
