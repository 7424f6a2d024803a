"""Supervised fine-tuning: ``torchrun --nproc_per_node N launch/sft.py [overrides]``.

Examples::

    torchrun --nproc_per_node 4 launch/sft.py device=cpu model=tiny parallel=tp2pp2 \
        init_from=runs/pretrain data.prefix=data/sft/chatmed_sft train.steps=20
    torchrun --nproc_per_node 8 launch/sft.py model=qwen2_7b parallel=qwen2_7b_8gpu \
        init_from=ckpt/qwen2-7b-mcore 'data.blend=[{prefix: data/sft/cmtmedqa_sft, weight: 2},
        {prefix: data/sft/huatuo26m_lite_sft, weight: 1}]' run_name=sft-7b
    python launch/sft.py engine=hf hf.model=hf/qwen2-7b hf.lora.enabled=true ...
"""

from sfmed.core.cli import hold_sigterm

hold_sigterm()  # until the config is validated: every rank then exits 2 on a config error

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from sfmed.config.sft import SFTConfig, register  # noqa: E402

register()


@hydra.main(config_path="../conf", config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sfmed.train.entry import launch

    launch("sft", cfg, SFTConfig, "sfmed.recipes.sft:SFTRecipe", hf_run="sfmed.hf_engine.sft:run")


if __name__ == "__main__":
    main()
