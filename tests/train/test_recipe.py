"""The Recipe protocol: pretraining's loss and summary by hand, the kind rule, and the shared
trainer running a recipe that is not pretraining (a frozen reference model, extra reported
metrics, its own throughput count and checkpoint kind)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "pretrain_v0"


def test_pretrain_loss_reports_sums_and_counts():
    from sfmed.recipes.pretrain import loss_func

    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    loss, count, rep = loss_func(mask, per_token)
    assert float(loss) == 1 + 3 + 4 + 5 and int(count) == 4
    assert rep["lm loss"].tolist() == [13.0, 4.0] and rep["tokens"].tolist() == [6.0]


def test_pretrain_summary_is_the_token_mean():
    from sfmed.config.pretrain import PretrainConfig
    from sfmed.recipes.pretrain import PretrainRecipe

    r = PretrainRecipe(PretrainConfig())
    rep = r.summarize({"lm loss": [13.0, 4.0], "tokens": [6.0]})
    assert (rep.loss, rep.loss_tokens, rep.tokens, rep.metrics) == (13.0 / 4, 4.0, 6.0, {})
    empty = r.summarize({"lm loss": [0.0, 0.0], "tokens": [0.0]})
    assert empty.loss == 0.0  # no division by zero on a step without loss tokens
    assert set(r.reports) == {"lm loss", "tokens"}
    with pytest.raises(TypeError, match="PretrainRecipe needs a PretrainConfig"):
        from sfmed.config.run import RunConfig

        PretrainRecipe(RunConfig())


def test_resume_refuses_a_checkpoint_of_another_kind(tmp_path):
    """A run resumes only its own kind; another stage's checkpoint is init_from material."""
    from sfmed.core import megatron_layout as layout
    from sfmed.core.errors import ConfigError

    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    ckpt = run / "iter_0000004"
    meta = layout.read_meta(ckpt)
    meta["origin"]["kind"] = "sft"
    layout.write_meta(ckpt, meta)
    from sfmed.recipes.pretrain import PretrainRecipe
    from sfmed.train.plan import make_plan

    cfg = compose_pretrain(
        [*_fixture_overrides(), f"data.prefix={FIXTURE / 'corpus_text_document'}",
         f"ckpt_dir={run}"]
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"is a 'sft' checkpoint(.|\n)*init_from="):
        make_plan(cfg, PretrainRecipe(cfg), world_size=1)
    meta["origin"]["kind"] = "pretrain"
    layout.write_meta(ckpt, meta)
    assert make_plan(cfg, PretrainRecipe(cfg), world_size=1).resume_from == ckpt


def compose_pretrain(overrides: list[str]):
    """The typed config ``launch/pretrain.py`` would get for ``overrides``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sfmed.config.pretrain import register

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="pretrain", overrides=overrides))


def _fixture_overrides() -> list[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURE / "make_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return [o for o in mod.OVERRIDES if not o.startswith("train.save_final=")]


@pytest.mark.dist
@pytest.mark.slow
def test_trainer_runs_a_recipe_with_a_frozen_reference(torchrun, tmp_path):
    """A non-pretraining recipe through the real trainer: extra model, metrics, kind, tokens."""
    run = tmp_path / "run"
    proc = torchrun(
        REPO / "tests" / "train" / "worker_recipe.py",
        *_fixture_overrides(),
        f"data.prefix={FIXTURE / 'corpus_text_document'}",
        f"init_from={FIXTURE / 'run'}",
        f"ckpt_dir={run}",
        "train.steps=3",
        "train.save_interval=0",
        "data.eod_mask_loss=true",  # loss tokens < positions: tells the two counts apart
        "data.eod_id=59",
        nproc=1,
    )
    assert "status complete" in proc.stdout
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    # Step 1: the policy is the reference (both loaded from init_from), so the losses agree;
    # afterwards the policy moves and the frozen reference does not.
    assert recs[0]["ref_loss"] == pytest.approx(recs[0]["loss"], rel=1e-6)
    assert abs(recs[2]["ref_loss"] - recs[2]["loss"]) > 1e-6
    ref = [r["ref_loss"] for r in recs]
    assert max(ref) - min(ref) < 0.5  # the reference sees new batches but never changes
    for r in recs:
        assert r["sequences"] == 4  # global batch size, summed over micro-batches
        # throughput counts what this recipe says: loss tokens, not the 4 × 16 positions
        assert 0 < r["tokens"] <= 4 * 16
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_time_s"], rel=1e-6)
    assert sum(r["tokens"] for r in recs) < 3 * 4 * 16  # EOD positions were left out
    meta = json.loads((run / "iter_0000003" / "sfmed.json").read_text())
    assert meta["origin"]["kind"] == "toy_reference"
