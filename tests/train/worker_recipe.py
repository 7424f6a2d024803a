"""torchrun worker: the shared trainer with a recipe that is not pretraining's.

``ReferenceRecipe`` extends pretraining the way a preference recipe does: a frozen reference model
(built by the trainer in the run's layout from ``init_from``) runs on every batch, and the loss
function reports the reference's loss sum and the number of sequences besides the LM loss. It
writes checkpoints of its own kind and counts only loss tokens for throughput.

    torchrun --nproc_per_node 1 tests/train/worker_recipe.py <hydra overrides of launch/pretrain.py>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sfmed.recipes.base import StepReport
from sfmed.recipes.pretrain import PretrainRecipe, loss_func


class ReferenceRecipe(PretrainRecipe):
    """Pretraining + a frozen reference's loss on the same batch, reported as metrics."""

    kind = "toy_reference"
    reports = {"lm loss": 2, "tokens": 1, "ref loss": 1, "sequences": 1}

    def extra_models(self, trainer):
        assert trainer.plan.init_from is not None
        self.reference = trainer.build_frozen_model(trainer.plan.init_from)
        return {"reference": self.reference}

    def forward_step(self, trainer):
        device = trainer.device

        def step(data_iterator, model):
            batch = {k: v.to(device) for k, v in next(data_iterator).items()}
            args = (batch["tokens"], batch["position_ids"], None)
            with torch.no_grad():
                ref = self.reference[0](*args, labels=batch["labels"])
            out = model(*args, labels=batch["labels"])

            def loss(output_tensor):
                total, count, rep = loss_func(batch["loss_mask"], output_tensor)
                mask = batch["loss_mask"].float()
                rep["ref loss"] = (ref.float() * mask).sum().view(1).detach()
                rep["sequences"] = torch.tensor([float(mask.shape[0])])
                return total, count, rep

            return out, loss

        return step

    def summarize(self, totals):
        base = super().summarize(totals)
        ref = totals["ref loss"][0] / max(totals["lm loss"][1], 1.0)
        return StepReport(
            loss=base.loss,
            loss_tokens=base.loss_tokens,
            tokens=base.loss_tokens,  # throughput over loss tokens, not every position
            metrics={"ref_loss": ref, "sequences": totals["sequences"][0]},
        )


def main(overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sfmed.config.pretrain import register
    from sfmed.train.trainer import run

    register()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="pretrain", overrides=overrides))
    print("status", run(cfg, ReferenceRecipe(cfg)))


if __name__ == "__main__":
    main(sys.argv[1:])
