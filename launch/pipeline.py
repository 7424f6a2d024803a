"""A whole recipe as one command: ``python launch/pipeline.py recipe=<name> [overrides]``.

Examples::

    python launch/pipeline.py recipe=tiny_cpu                  # the tiny demo, ~5 min on 2 CPUs
    python launch/pipeline.py recipe=sfmed_qwen2_7b dry_run=true   # plan, tokens, GPU-hours
    python launch/pipeline.py recipe=sfmed_qwen2_7b data_root=/data/raw launcher=slurm
    python launch/pipeline.py recipe=tiny_cpu 'stages=[sft,export,evaluate]'

Recipes: conf/recipe/; the run folder, manifest and resume rules: docs/pipeline.md.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sfmed.config.pipeline import register
from sfmed.config.validate import build_config

register()


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    return hydra.compose(config_name=config_name, overrides=overrides)


@hydra.main(config_path="../conf", config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sfmed.core.cli import run_cli
    from sfmed.core.logging import setup_logging

    setup_logging()
    argv = list(HydraConfig.get().overrides.task)

    def pipeline() -> int:
        from sfmed.pipeline.app import run_pipeline

        return run_pipeline(build_config(cfg), argv, _compose)

    sys.exit(run_cli("pipeline", pipeline))


if __name__ == "__main__":
    main()
