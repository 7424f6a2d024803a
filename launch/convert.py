"""HF <-> Megatron checkpoint conversion (exact, streaming): ``python launch/convert.py``.

Examples::

    python launch/convert.py to=mcore src=models/Qwen2-7B-Instruct dst=ckpt/qwen2-7b \
        parallel.tp=2 parallel.pp=2
    python launch/convert.py to=hf src=runs/sft-7b dst=export/sft-7b-hf
"""

import hydra
from omegaconf import DictConfig

from sfmed.config.convert import register
from sfmed.config.validate import build_config

register()


@hydra.main(config_path="../conf", config_name="convert", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sfmed.core.cli import run_cli
    from sfmed.core.logging import setup_logging

    setup_logging()

    def convert():
        from sfmed.convert.app import run_convert

        return run_convert(build_config(cfg))  # typed ConvertConfig, validated

    print(run_cli("convert", convert).line())


if __name__ == "__main__":
    main()
