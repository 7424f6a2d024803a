"""Preference alignment (DPO and variants): ``torchrun --nproc_per_node N launch/dpo.py [overrides]``.

Examples::

    torchrun --nproc_per_node 4 launch/dpo.py device=cpu model=tiny parallel=tp2pp2 \
        init_from=runs/sft data.prefix=data/dpo/dpo_zh_500_preference train.steps=30
    torchrun --nproc_per_node 8 launch/dpo.py model=qwen2_7b parallel=qwen2_7b_8gpu \
        init_from=runs/sft-7b data.prefix=data/dpo/medical_reward_preference \
        dpo.beta=0.1 optim.lr=5e-7 run_name=dpo-7b
    python launch/dpo.py engine=hf hf.model=hf/qwen2-7b-sft hf.lora.enabled=true ...
"""

from sfmed.core.cli import hold_sigterm

hold_sigterm()  # until the config is validated: every rank then exits 2 on a config error

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from sfmed.config.dpo import DPOConfig, register  # noqa: E402

register()


@hydra.main(config_path="../conf", config_name="dpo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sfmed.train.entry import launch

    launch("dpo", cfg, DPOConfig, "sfmed.recipes.dpo:DPORecipe", hf_run="sfmed.hf_engine.dpo:run")


if __name__ == "__main__":
    main()
