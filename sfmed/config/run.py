"""The run-config base every training stage shares: model, parallel, optim, train, logging + run.

A stage's schema subclasses :class:`RunConfig` and adds its own groups (pretraining adds
``data``); the shared trainer (``sfmed.train``) reads only these fields, so every recipe gets
the same checkpointing, resume, logging and parallelism settings under the same names.
Schemas import neither torch nor Hydra at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sfmed.config.logging import LoggingConfig
from sfmed.config.model import ModelConfig
from sfmed.config.optim import OptimConfig
from sfmed.config.parallel import ParallelConfig
from sfmed.config.train import TrainConfig
from sfmed.core.errors import Problems

DEVICES = ("auto", "cuda", "cpu")


@dataclass
class RunConfig:
    """What every training run has: the model, how it is split, optimised, run and logged."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_name: str = "run"
    ckpt_dir: str = "runs/${run_name}"
    """The run's folder: iter_N checkpoints, tracker, metrics.jsonl, data cache, wandb."""

    init_from: str | None = None
    """A converted or trained checkpoint (``launch/convert.py to=mcore``, or another run): weights
    only, fresh optimizer. Ignored when the run resumes from its own checkpoint."""

    resume: str = "auto"
    """``auto``: continue from the latest complete checkpoint in ckpt_dir when there is one
    (model, optimizer, scheduler, RNG, data position); ``never``: refuse to start when ckpt_dir
    already holds checkpoints; or a checkpoint path to continue from (saving into ckpt_dir)."""

    device: str = "auto"
    """auto | cuda | cpu (the CPU emulation of megatron-core's CUDA code, gloo)."""

    def __post_init__(self):
        p = Problems()
        p.choice("device", self.device, DEVICES)
        if not self.resume:
            p.add("resume is empty; use auto, never, or a checkpoint path")
        if not self.ckpt_dir:
            p.add("ckpt_dir is empty; give the run's folder, e.g. runs/<name>")
        if not self.run_name:
            p.add("run_name is empty; give the run a name, e.g. run_name=cpt-7b")
        p.raise_if_any()
