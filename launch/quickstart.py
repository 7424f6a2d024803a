"""The main job on a built-in default: ``python launch/quickstart.py`` (no arguments needed).

Builds a tiny random Qwen2, converts it to a TP=2 x PP=2 Megatron checkpoint, loads that into
megatron-core's GPTModel (4 torchrun processes; the CPU emulation when there are no GPUs),
compares logits with transformers, converts back to HF and checks it is bit-exact. Prints a
summary; exit code 0 when every check passes, 1 otherwise, 2 on a configuration error.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from sfmed.config.convert import register

register()


@hydra.main(config_path="../conf", config_name="quickstart", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sfmed.convert.app import USER_ERRORS, setup_logging
    from sfmed.convert.quickstart import run_quickstart

    setup_logging()
    try:
        report = run_quickstart(OmegaConf.to_object(cfg))  # typed QuickstartConfig, validated
    except USER_ERRORS as e:
        print(f"quickstart: error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(["sfmed quickstart:", *report.lines, "PASSED" if report.passed else "FAILED"]))
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
