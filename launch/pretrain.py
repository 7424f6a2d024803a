"""Continued pretraining: ``torchrun --nproc_per_node N launch/pretrain.py [overrides]``.

Examples::

    torchrun --nproc_per_node 4 launch/pretrain.py device=cpu model=tiny parallel=tp2pp2 \
        data.prefix=data/tiny_text_document train.steps=30
    torchrun --nproc_per_node 8 launch/pretrain.py model=qwen2_7b parallel=qwen2_7b_8gpu \
        init_from=ckpt/qwen2-7b-mcore data=pretrain_medical run_name=cpt-7b
"""

from sfmed.core.cli import hold_sigterm

hold_sigterm()  # until the config is validated: every rank then exits 2 on a config error

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from sfmed.config.pretrain import PretrainConfig, register  # noqa: E402

register()


@hydra.main(config_path="../conf", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sfmed.train.entry import launch

    launch("pretrain", cfg, PretrainConfig, "sfmed.recipes.pretrain:PretrainRecipe")


if __name__ == "__main__":
    main()
