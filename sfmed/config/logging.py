"""Schema of the ``logging`` group (``conf/logging/*.yaml``): console, metrics.jsonl, wandb."""

from __future__ import annotations

from dataclasses import dataclass, field

from sfmed.core.errors import ConfigError, Problems

WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbConfig:
    """Weights & Biases run settings (rank 0 logs)."""

    mode: str = "disabled"
    """online | offline (sync later with ``wandb sync``) | disabled."""

    project: str = "sfmed"
    entity: str | None = None
    name: str | None = None
    """Run name (default: the run_name)."""

    tags: list[str] = field(default_factory=list)
    group: str | None = None
    dir: str | None = None
    """Where wandb writes (default: the run's checkpoint folder)."""

    def __post_init__(self):
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb.mode={self.mode!r} is not one of {list(WANDB_MODES)}")


@dataclass
class LoggingConfig:
    """What rank 0 reports every ``interval`` steps."""

    interval: int = 1
    """Console line + metrics.jsonl record + wandb point every N steps."""

    level: str = "INFO"
    peak_tflops: float | None = None
    """Per-GPU peak for MFU; ``None`` = detected (H100/H200: 989 bf16, 1979 fp8; A100: 312)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        p = Problems()
        if self.interval < 1:
            p.add(f"logging.interval={self.interval} must be >= 1")
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            p.add(f"logging.level={self.level!r}: use DEBUG, INFO, WARNING or ERROR")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            p.add(f"logging.peak_tflops={self.peak_tflops} must be > 0 or null")
        p.raise_if_any()
