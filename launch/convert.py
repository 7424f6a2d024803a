"""HF Qwen2 <-> Megatron checkpoint conversion (exact, streaming): ``python launch/convert.py``.

Examples::

    python launch/convert.py to=mcore src=models/Qwen2-7B-Instruct dst=ckpt/qwen2-7b \
        parallel.tp=2 parallel.pp=2
    python launch/convert.py to=hf src=runs/sft-7b dst=export/sft-7b-hf
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from sfmed.config.convert import register

register()


@hydra.main(config_path="../conf", config_name="convert", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sfmed.convert.app import USER_ERRORS, run_convert, setup_logging

    setup_logging()
    try:
        summary = run_convert(OmegaConf.to_object(cfg))  # typed ConvertConfig, validated
    except USER_ERRORS as e:
        print(f"convert: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary.line())


if __name__ == "__main__":
    main()
