"""The main job on a built-in default: ``python launch/quickstart.py`` (no arguments needed).

Builds a tiny random Qwen2, converts it to a TP=2 x PP=2 Megatron checkpoint, loads that into
megatron-core's GPTModel (4 torchrun processes; the CPU emulation when there are no GPUs),
compares logits with transformers, converts back to HF and checks it is bit-exact. Prints a
summary; exit code 0 when every check passes, 1 otherwise, 2 on a configuration error.
"""

import sys

import hydra
from omegaconf import DictConfig

from sfmed.config.convert import register
from sfmed.config.validate import build_config

register()


@hydra.main(config_path="../conf", config_name="quickstart", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sfmed.core.cli import run_cli
    from sfmed.core.logging import setup_logging

    setup_logging()

    def quickstart():
        from sfmed.convert.quickstart import run_quickstart

        return run_quickstart(build_config(cfg))  # typed QuickstartConfig, validated

    report = run_cli("quickstart", quickstart)
    print("\n".join(["sfmed quickstart:", *report.lines, "PASSED" if report.passed else "FAILED"]))
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
