"""Continued pretraining: ``torchrun --nproc_per_node N launch/pretrain.py [overrides]``.

Examples::

    torchrun --nproc_per_node 4 launch/pretrain.py device=cpu model=tiny parallel=tp2pp2 \
        data.prefix=data/tiny_text_document train.steps=30
    torchrun --nproc_per_node 8 launch/pretrain.py model=qwen2_7b parallel=qwen2_7b_8gpu \
        init_from=ckpt/qwen2-7b-mcore data=pretrain_medical run_name=cpt-7b
"""

import hydra
from omegaconf import DictConfig

from sfmed.config.pretrain import register

register()


@hydra.main(config_path="../conf", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sfmed.core.logging import quiet_third_party

    quiet_third_party()  # before megatron-core is imported
    from sfmed.recipes.pretrain import PretrainRecipe
    from sfmed.train.trainer import launch

    launch("pretrain", cfg, PretrainRecipe)


if __name__ == "__main__":
    main()
