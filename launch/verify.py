"""Check a conversion by its logits: ``python launch/verify.py hf=<HF dir> mcore=<checkpoint>``.

Prints max |dlogit|, KL and top-1 agreement of megatron-core (at parallel.tp x parallel.pp,
torchrun workers, training's layer spec) against transformers; exit code 0 within tolerance,
1 past it, 2 on bad input.

Examples::

    python launch/verify.py hf=models/Qwen2-7B-Instruct mcore=ckpt/qwen2-7b parallel.tp=2
    python launch/verify.py hf=outputs/quickstart/hf mcore=outputs/quickstart/mcore-tp2pp2 \
        parallel.tp=2 parallel.pp=2 device=cpu
"""

import sys

import hydra
from omegaconf import DictConfig

from sfmed.config.convert import register
from sfmed.config.validate import build_config

register()


@hydra.main(config_path="../conf", config_name="verify", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sfmed.core.cli import run_cli
    from sfmed.core.logging import setup_logging

    setup_logging()

    def verify():
        from sfmed.convert.app import run_verify

        return run_verify(build_config(cfg))  # typed VerifyConfig, validated

    result = run_cli("verify", verify)
    print(result.line())
    print("RESULT " + result.to_json())
    sys.exit(0 if result.passed else 1)


if __name__ == "__main__":
    main()
