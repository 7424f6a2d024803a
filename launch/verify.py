"""Check a conversion by its logits: ``python launch/verify.py hf=<HF dir> mcore=<checkpoint>``.

Prints max |dlogit|, KL and top-1 agreement of megatron-core (at parallel.tp x parallel.pp,
torchrun workers) against transformers; exit code 0 within tolerance, 1 past it, 2 on bad input.

Examples::

    python launch/verify.py hf=models/Qwen2-7B-Instruct mcore=ckpt/qwen2-7b parallel.tp=2
    python launch/verify.py hf=outputs/quickstart/hf mcore=outputs/quickstart/mcore-tp2pp2 \
        parallel.tp=2 parallel.pp=2 device=cpu
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from sfmed.config.convert import register

register()


@hydra.main(config_path="../conf", config_name="verify", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sfmed.convert.app import USER_ERRORS, run_verify, setup_logging

    setup_logging()
    try:
        result = run_verify(OmegaConf.to_object(cfg))  # typed VerifyConfig, validated
    except USER_ERRORS as e:
        print(f"verify: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(result.line())
    print("RESULT " + result.to_json())
    sys.exit(0 if result.passed else 1)


if __name__ == "__main__":
    main()
