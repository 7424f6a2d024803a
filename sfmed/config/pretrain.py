"""Schema of ``launch/pretrain.py``: the groups model/parallel/data/optim/train/logging + run.

YAML under ``conf/`` only sets values. :func:`register` stores the schema in Hydra's ConfigStore
(Hydra is imported lazily, so library code and tests use these dataclasses without it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sfmed.config.logging import LoggingConfig
from sfmed.config.model import ModelConfig
from sfmed.config.optim import OptimConfig
from sfmed.config.parallel import ParallelConfig
from sfmed.config.pretrain_data import PretrainDataConfig
from sfmed.config.train import TrainConfig
from sfmed.core.errors import ConfigError

DEVICES = ("auto", "cuda", "cpu")


@dataclass
class PretrainConfig:
    """Continued pretraining of a Qwen2 model on megatron-core."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    run_name: str = "pretrain"
    ckpt_dir: str = "runs/${run_name}"
    """The run's folder: iter_N checkpoints, tracker, metrics.jsonl, data cache, wandb."""

    init_from: str | None = None
    """A converted checkpoint (``launch/convert.py to=mcore``): weights only, fresh optimizer.
    Ignored when the run resumes from its own checkpoint."""

    resume: str = "auto"
    """``auto``: continue from the latest complete checkpoint in ckpt_dir when there is one
    (model, optimizer, scheduler, RNG, data position); ``never``: refuse to start when ckpt_dir
    already holds checkpoints; or a checkpoint path to continue from (saving into ckpt_dir)."""

    device: str = "auto"
    """auto | cuda | cpu (the CPU emulation of megatron-core's CUDA code, gloo)."""

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r} is not one of {list(DEVICES)}")
        if not self.resume:
            raise ConfigError("resume is empty; use auto, never, or a checkpoint path")
        if not self.ckpt_dir:
            raise ConfigError("ckpt_dir is empty; give the run's folder, e.g. runs/<name>")


def register() -> None:
    """Register the schema as ``pretrain_schema`` in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)
