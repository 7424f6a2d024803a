"""Schema of the ``train`` group (``conf/train/*.yaml``): steps, batches, precision, checkpoints."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from sfmed.core.errors import Problems

PRECISIONS = ("auto", "bf16", "fp16", "fp32", "fp8")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_FORMATS = ("hybrid", "e4m3")
OPTIM_CKPT_FORMATS = ("fully_reshardable", "dp_reshardable")


@dataclass
class TrainConfig:
    """The training run: how long, how big a batch, which precision, when to checkpoint."""

    steps: int = 1000
    """Optimizer steps of the whole run (a resumed run continues up to this number)."""

    global_batch_size: int = 8
    """Sequences per optimizer step (= micro_batch_size × data-parallel size × micro-batches)."""

    micro_batch_size: int = 1
    seed: int = 1234

    precision: str = "auto"
    """bf16 | fp16 | fp32 | fp8 (bf16 + FP8 GEMMs through Transformer Engine) | auto (bf16 on
    CUDA, fp32 on the CPU emulation). Master weights and optimizer state are always fp32."""

    fp8_recipe: str = "tensorwise"
    """delayed (amax history), tensorwise (current scaling), blockwise (Hopper+, TE >= 2.3),
    mxfp8 (Blackwell)."""

    fp8_format: str = "hybrid"
    """hybrid (E4M3 forward, E5M2 gradients) or e4m3."""

    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_param_gather: bool = False
    """Keep FP8 weights and all-gather them in FP8 (distributed optimizer)."""

    save_interval: int = 1000
    """Checkpoint every N steps (0 = none on the way); a run also saves at its end (save_final)
    and when an exit signal or the time limit stops it."""

    save_final: bool = True
    """Save at the end of the run (benchmarks turn it off)."""

    keep_last: int | None = 3
    """Keep the newest K checkpoints (``None`` = keep all)."""

    async_save: bool = False
    """Write checkpoints in a background process (megatron-core async torch_dist save); the
    tracker file moves only once the save is finalised."""

    optim_ckpt_format: str = "fully_reshardable"
    """Distributed-optimizer state layout: ``fully_reshardable`` (resume under any TP/PP/DP) or
    ``dp_reshardable`` (faster, only DP may change)."""

    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make every rank save a checkpoint and exit at the next step boundary."""

    exit_duration_minutes: float | None = None
    """Save and exit once the run has lasted this long (e.g. a few minutes under the Slurm
    time limit)."""

    eval_interval: int = 0
    """Validation loss every N steps on the valid split (0 = off)."""

    eval_iters: int = 10
    """Global batches per validation."""

    def __post_init__(self):
        p = Problems()
        if self.steps < 1:
            p.add(f"train.steps={self.steps} must be >= 1")
        # Divisibility is asked only of batch sizes that are themselves valid.
        if p.check(
            self.global_batch_size >= 1 and self.micro_batch_size >= 1,
            f"train.global_batch_size={self.global_batch_size} and "
            f"train.micro_batch_size={self.micro_batch_size} must be >= 1",
        ):
            p.check(
                self.global_batch_size % self.micro_batch_size == 0,
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size={self.micro_batch_size}",
            )
        for name, value, allowed in (
            ("precision", self.precision, PRECISIONS),
            ("fp8_recipe", self.fp8_recipe, FP8_RECIPES),
            ("fp8_format", self.fp8_format, FP8_FORMATS),
            ("optim_ckpt_format", self.optim_ckpt_format, OPTIM_CKPT_FORMATS),
        ):
            p.choice(f"train.{name}", value, allowed)
        if self.save_interval < 0:
            p.add(f"train.save_interval={self.save_interval} must be >= 0")
        if self.keep_last is not None and self.keep_last < 1:
            p.add(f"train.keep_last={self.keep_last} must be >= 1 or null (keep all)")
        if self.eval_interval < 0 or self.eval_iters < 1:
            p.add("train.eval_interval must be >= 0 and train.eval_iters >= 1")
        for name in self.exit_signals:
            if not isinstance(getattr(signal, str(name), None), signal.Signals):
                p.add(f"train.exit_signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
        if self.exit_duration_minutes is not None and self.exit_duration_minutes <= 0:
            p.add(f"train.exit_duration_minutes={self.exit_duration_minutes} must be > 0 or null")
        p.raise_if_any()
