"""Continued pretraining: ``torchrun --nproc_per_node N launch/pretrain.py [overrides]``.

Examples::

    torchrun --nproc_per_node 4 launch/pretrain.py device=cpu model=tiny parallel=tp2pp2 \
        data.prefix=data/tiny_text_document train.steps=30
    torchrun --nproc_per_node 8 launch/pretrain.py model=qwen2_7b parallel=qwen2_7b_8gpu \
        init_from=ckpt/qwen2-7b-mcore data=pretrain_medical run_name=cpt-7b
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from sfmed.config.pretrain import register
from sfmed.core.errors import ConfigError

register()


@hydra.main(config_path="../conf", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sfmed.train.pretrain import run

    try:
        conf = OmegaConf.to_object(cfg)  # the typed PretrainConfig; __post_init__ validates
        status = run(conf)
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"pretrain: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pretrain: {status}")


if __name__ == "__main__":
    main()
