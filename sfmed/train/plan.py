"""Check a run config against the world it will run in, before any work starts.

:func:`make_plan` resolves everything that can be decided without a process group — device,
precision, layer spec, data-parallel size, micro-batches, vocabulary padding, which checkpoint to
resume from or initialise from — and asks the recipe to check and resolve its own settings (the
data). It raises :class:`ConfigError` naming the value and the fix for every combination that
cannot work, and reads only small files (checkpoint metadata, dataset headers); the result is
the :class:`TrainPlan` the trainer follows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfmed.config.run import RunConfig
from sfmed.core import megatron_layout as layout
from sfmed.core.dtypes import torch_dtype
from sfmed.core.errors import ConfigError
from sfmed.core.parallel import validate_parallel, validate_parallel_sizes, validate_vpp
from sfmed.models import (
    ModelArch,
    arch_from_dict,
    checkpoint_vocab_size,
    te_available,
)

if TYPE_CHECKING:
    import torch

    from sfmed.recipes.base import Recipe

log = logging.getLogger(__name__)

# ModelArch fields that may differ between a checkpoint and the configured model: the storage
# dtype, and the position limit (RoPE has no position table; only the sequence length matters).
_ARCH_FREE_FIELDS = ("torch_dtype", "max_position_embeddings", "extra")


@dataclass
class TrainPlan:
    """Everything the trainer needs that follows from the config and the world size."""

    arch: ModelArch
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
    seq_length: int = 0
    resume_from: Path | None = None
    init_from: Path | None = None
    ckpt_meta: dict = field(default_factory=dict)
    reshard: bool = False
    decay_steps: int = 0
    warmup_steps: int = 0
    vpp: int | None = None
    kind: str = ""
    """The recipe's checkpoint kind."""
    recipe: Any = None
    """What the recipe resolved for its own settings (``Recipe.resolve``)."""

    @property
    def params_dtype(self) -> torch.dtype:
        """dtype of the model parameters (optimizer master weights are always fp32)."""
        # FP8 runs keep bf16 parameters; Transformer Engine casts the GEMM inputs.
        return torch_dtype("bf16" if self.precision == "fp8" else self.precision)

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
            f"{self.kind}: world={self.world_size} dp={self.dp} "
            f"micro-batches={self.num_microbatches} seq={self.seq_length} "
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


# The oldest Transformer Engine each FP8 recipe works with: megatron-core's
# fp8_utils.get_fp8_recipe raises at the first forward below these.
FP8_RECIPE_MIN_TE = {
    "delayed": "1.0",
    "mxfp8": "2.1.0",
    "tensorwise": "2.2.0.dev0",
    "blockwise": "2.3.0.dev0",
}


def megatron_te_range() -> str | None:
    """The Transformer Engine versions the installed megatron-core declares (its metadata)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        reqs = metadata.requires("megatron-core") or []
    except metadata.PackageNotFoundError:
        return None
    for r in map(Requirement, reqs):
        if r.name.replace("_", "-") == "transformer-engine" and str(r.specifier):
            return str(r.specifier)
    return None


def check_te_version(cfg: RunConfig, version: str | None = None, warn_range: bool = True) -> None:
    """Refuse a Transformer Engine too old for ``train.fp8_recipe``; warn (``warn_range``)
    outside the range megatron-core declares. ``version`` defaults to the installed one."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if version is None:
        from sfmed.models.specs import te_version

        version = te_version()
    if version is None:
        return
    v = Version(version)
    if cfg.train.precision == "fp8":
        need = FP8_RECIPE_MIN_TE.get(cfg.train.fp8_recipe)
        if need is not None and v < Version(need):
            raise ConfigError(
                f"train.fp8_recipe={cfg.train.fp8_recipe} needs Transformer Engine >= {need}; "
                f"{version} is installed. pip install 'transformer-engine[pytorch]"
                f"{megatron_te_range() or '>=' + need}', or use train.fp8_recipe=delayed"
            )
    supported = megatron_te_range() if warn_range else None
    if supported and not SpecifierSet(supported, prereleases=True).contains(v, prereleases=True):
        log.warning(
            "Transformer Engine %s is outside the range megatron-core supports (%s); "
            "pip install 'transformer-engine[pytorch]%s'",
            version,
            supported,
            supported,
        )


def _resolve_impl(cfg: RunConfig, device: str, precision: str) -> tuple[str, str]:
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
        check_te_version(cfg)
        return impl, "te"
    attention = cfg.model.attention_backend
    if attention == "auto":
        attention = "sdpa"
        if device == "cuda" and precision in ("bf16", "fp16"):
            from sfmed.models.specs import flash_attn_status

            ok, why = flash_attn_status()
            if ok:
                attention = "flash"
            else:
                log.info("attention_backend=auto: using PyTorch SDPA, not flash-attn: %s", why)
    if attention == "flash":
        from sfmed.models.specs import flash_attn_status

        ok, why = flash_attn_status()
        if not ok:
            raise ConfigError(
                f"model.attention_backend=flash but {why}; pip install flash-attn built for "
                "this torch, or use model.attention_backend=sdpa"
            )
        if device != "cuda" or precision not in ("bf16", "fp16"):
            raise ConfigError(
                "model.attention_backend=flash needs CUDA and bf16/fp16 (train.precision); "
                "use attention_backend=sdpa"
            )
    return impl, attention


def _resolve_precision(cfg: RunConfig, device: str) -> str:
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
        import torch

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
        check_te_version(cfg, warn_range=False)  # the TE layer spec warns about the range
        if cfg.train.fp8_recipe == "mxfp8" and cc < 100:
            raise ConfigError(
                "train.fp8_recipe=mxfp8 needs Blackwell (compute capability 10+); use "
                "fp8_recipe=tensorwise or blockwise on Hopper"
            )
    return p


def _check_arch_matches(
    arch: ModelArch, meta: dict, where: Path, what: str, name: str = "<preset>"
) -> None:
    if not meta.get("arch"):
        return
    # Metadata written before model families existed reads as its family's defaults.
    ckpt = arch_from_dict(meta["arch"])
    diff = [
        f"{f.name}: checkpoint {getattr(ckpt, f.name)!r} vs model {getattr(arch, f.name)!r}"
        for f in dataclasses.fields(ModelArch)
        if f.name not in _ARCH_FREE_FIELDS and getattr(ckpt, f.name) != getattr(arch, f.name)
    ]
    if diff:
        raise ConfigError(
            f"{what}={where} holds a model of a different shape than model={name} "
            f"({arch.num_layers}L/{arch.hidden_size}h):\n  "
            + "\n  ".join(diff)
            + "\nleave model= out (model=auto takes the checkpoint's architecture), choose the "
            "model group that matches the checkpoint, or give model.hf_config=<the HF folder it "
            "was converted from>"
        )


def _find_checkpoints(cfg: RunConfig, run_dir: Path) -> tuple[Path | None, Path | None]:
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


def _model_arch(cfg: RunConfig, src: Path | None, meta: dict) -> ModelArch:
    """The configured architecture, or with ``model=auto`` the one ``src`` records."""
    m = cfg.model
    if not m.from_checkpoint or m.hf_config or src is None:
        return m.arch()
    if meta.get("arch"):
        return arch_from_dict(meta["arch"])
    for cand in (src / layout.HF_SIDECAR, src.parent / layout.HF_SIDECAR):
        if (cand / "config.json").is_file():
            from sfmed.models import arch_from_hf_config

            return arch_from_hf_config(cand)
    raise ConfigError(
        f"model=auto takes the architecture from {src}, but it records none (no sfmed.json "
        f"arch, no {layout.HF_SIDECAR}/config.json); choose the model group that matches it "
        "(e.g. model=qwen2_7b) or give model.hf_config=<the HF folder it was converted from>"
    )


def make_plan(cfg: RunConfig, recipe: Recipe, world_size: int | None = None) -> TrainPlan:
    """Validate ``cfg`` for ``world_size`` processes (default: $WORLD_SIZE) and resolve it,
    with ``recipe`` checking and resolving its own settings."""
    p, t = cfg.parallel, cfg.train
    world = _world_size(world_size)
    run_dir = Path(cfg.ckpt_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"ckpt_dir={run_dir} exists and is not a folder")
    resume_from, init_from = _find_checkpoints(cfg, run_dir)
    src = resume_from or init_from
    meta = layout.read_meta(src) if src else {}
    arch = _model_arch(cfg, src, meta)
    validate_parallel(arch, p.tp, p.pp)  # before the world size: the more useful message
    dp = validate_parallel_sizes(world, p.tp, p.pp, p.cp)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"micro_batch_size × data-parallel size = {t.micro_batch_size} × {dp} = "
            f"{t.micro_batch_size * dp}; use a multiple of {t.micro_batch_size * dp}"
        )
    nmb = t.global_batch_size // (t.micro_batch_size * dp)
    vpp = validate_vpp(arch.num_layers, p.pp, p.vpp, nmb)
    seq, seq_key = recipe.seq_length(), recipe.seq_length_setting
    sp = p.sequence_parallel
    if sp and p.tp == 1:
        log.warning("parallel.sequence_parallel=true has no effect with tp=1; turning it off")
        sp = False
    if sp and seq % p.tp:
        raise ConfigError(
            f"{seq_key}={seq} is not divisible by parallel.tp={p.tp} "
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
            raise ConfigError(f"{seq_key}={seq} must be divisible by 2 × parallel.cp")
    if precision == "fp8" and impl != "transformer_engine":
        raise ConfigError("train.precision=fp8 needs model.transformer_impl=transformer_engine")
    if seq > arch.max_position_embeddings:
        log.warning(
            "%s=%d exceeds max_position_embeddings=%d of the model",
            seq_key,
            seq,
            arch.max_position_embeddings,
        )
    decay_steps = cfg.optim.decay_steps or t.steps
    warmup_steps = cfg.optim.resolve_warmup(decay_steps)
    if warmup_steps >= decay_steps:
        raise ConfigError(
            f"optim.warmup_steps={warmup_steps} must be smaller than the decay horizon "
            f"optim.decay_steps={decay_steps} (default: train.steps); lower it, or unset it "
            "(optim.warmup_steps=null) to warm up over optim.warmup_fraction of the run"
        )

    if src is not None:
        _check_arch_matches(
            arch, meta, src, "resume" if resume_from else "init_from", cfg.model.name
        )
    if resume_from is not None:
        recipe.check_resume(meta, resume_from)
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
        seq_length=seq,
        resume_from=resume_from,
        init_from=init_from,
        ckpt_meta=meta,
        reshard=reshard,
        decay_steps=decay_steps,
        warmup_steps=warmup_steps,
        vpp=vpp,
        kind=recipe.kind,
    )
    plan.recipe = recipe.resolve(plan)
    return plan
