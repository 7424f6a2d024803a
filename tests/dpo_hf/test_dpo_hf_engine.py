"""``launch/dpo.py engine=hf`` in process on a tiny Qwen2: the step-0 gate (loss ln 2, rewards
0, log-probs equal to plain transformers'), loss_type reaching TRL, the reference modes and
micro-batch splits agreeing, the LR schedule, resume, export, and errors before work."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dpo_hf_helpers import answer_logps, engine_cfg, first_samples, metrics, stored_pairs

from sfmed.core.errors import ConfigError, UserError
from sfmed.hf_engine.dpo import run

pytest_plugins = ["dpo_hf_fixtures"]


@pytest.fixture(scope="module")
def runs(dpo_model, pairs_prefix, tmp_path_factory):
    """3 steps, the reference a second frozen copy (mbs 2 x 2), or precomputed (mbs 1 x 4)."""
    tmp = tmp_path_factory.mktemp("dpo_runs")
    fly = engine_cfg(dpo_model, pairs_prefix, tmp / "fly", "reference.mode=on_the_fly")
    assert run(fly) == "complete"
    pre = engine_cfg(
        dpo_model, pairs_prefix, tmp / "pre", "reference.mode=precompute",
        "train.micro_batch_size=1", "train.save_final=false",
    )  # fmt: skip
    assert run(pre) == "complete"
    return {"fly": tmp / "fly", "pre": tmp / "pre", "tmp": tmp}


def test_step0_is_ln2_with_the_stored_pairs_log_probs(runs, dpo_model, pairs_prefix):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dpo_model)
    stored = stored_pairs(pairs_prefix)
    c_lp, r_lp, n = [], [], 0
    for s in first_samples(pairs_prefix, 4):
        c, cm, r, rm = stored[s]
        (a, na), (b, nb) = answer_logps(model, c, cm), answer_logps(model, r, rm)
        c_lp.append(a)
        r_lp.append(b)
        n += na + nb
    for name in ("fly", "pre"):
        r = metrics(runs[name])[0]
        assert r["step"] == 1 and r["pairs"] == 4 and r["tokens"] == n
        assert r["loss"] == pytest.approx(math.log(2), abs=1e-6)
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert r[k] == 0.0, (name, k)
        assert r["logps/chosen"] == pytest.approx(sum(c_lp) / 4, rel=1e-5)
        assert r["logps/rejected"] == pytest.approx(sum(r_lp) / 4, rel=1e-5)


def test_reference_modes_and_microbatch_splits_agree(runs):
    a, b = metrics(runs["fly"]), metrics(runs["pre"])
    assert [r["step"] for r in a] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "grad_norm", "rewards/margins", "logps/rejected"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["step"], k)
    assert a[-1]["loss"] < a[0]["loss"] and a[-1]["rewards/margins"] > 0  # it trained


def test_lr_follows_megatrons_schedule_with_warmup_fraction(runs):
    # conf/dpo.yaml: warmup_fraction 0.1 of 3 steps rounds to no warmup; cosine from 1e-3 to
    # 1e-4 over 3 steps, step k at the schedule's value at k (megatron-core's formula by hand)
    want = [1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in (1, 2, 3)]
    assert [r["lr"] for r in metrics(runs["fly"])] == pytest.approx(want, rel=1e-9)


def test_run_folder_and_export(runs, dpo_model):
    from safetensors.torch import load_file

    d = runs["fly"]
    assert json.loads((d / "status.json").read_text()) == {
        "status": "complete", "iteration": 3, "steps": 3, "reason": "",
    }  # fmt: skip
    new, old = load_file(d / "hf" / "model.safetensors"), load_file(dpo_model / "model.safetensors")
    assert set(new) == set(old) and any(not torch.equal(new[k], old[k]) for k in old)
    assert (d / "hf" / "tokenizer_config.json").is_file()
    assert not (runs["pre"] / "hf").exists()  # save_final=false
    assert {"rewards/margins", "logps/chosen", "pairs", "tokens_per_s"} <= set(metrics(d)[0])


@pytest.mark.parametrize(("loss_type", "want"), [("ipo", 1 / (4 * 0.1**2)), ("hinge", 1.0)])
def test_loss_type_reaches_trl(loss_type, want, dpo_model, pairs_prefix, tmp_path):
    """With policy = reference the margin is 0: IPO's loss is (1/(2β))², hinge's 1 (sigmoid's
    ln 2 above) — the option is not silently trained as sigmoid."""
    cfg = engine_cfg(
        dpo_model, pairs_prefix, tmp_path, f"dpo.loss_type={loss_type}", "train.steps=1",
        "train.save_final=false",
    )  # fmt: skip
    assert run(cfg) == "complete"
    assert metrics(tmp_path)[0]["loss"] == pytest.approx(want, rel=1e-6)


def test_interrupted_run_resumes_exactly(runs, dpo_model, pairs_prefix):
    d = runs["tmp"] / "resumed"
    args = ["reference.mode=on_the_fly", "train.save_interval=1"]
    cfg = engine_cfg(dpo_model, pairs_prefix, d, *args, "train.exit_duration_minutes=1e-9")
    assert run(cfg) == "interrupted"
    st = json.loads((d / "status.json").read_text())
    assert st["status"] == "interrupted" and st["iteration"] == 1
    assert st["reason"] == "exit_duration_minutes" and not (d / "hf").exists()
    assert run(engine_cfg(dpo_model, pairs_prefix, d, *args)) == "complete"
    got, ref = metrics(d), metrics(runs["fly"])
    assert [r["step"] for r in got] == [1, 2, 3]
    for x, y in zip(got, ref, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], rel=1e-5, abs=1e-7)


def test_config_errors_before_work(dpo_model, pairs_prefix, tiny_tokenizer_dir, tmp_path):
    from dpo_hf_helpers import prepare

    packed = prepare(tmp_path / "packed", tiny_tokenizer_dir, n=6, pack=True, seq_length=512)

    def cfg(*o, prefix=pairs_prefix):
        return engine_cfg(dpo_model, prefix, tmp_path / "r", *o)

    cases = [
        (cfg("dpo.label_smoothing=0.2"), r"TRL 1.x applies label smoothing only to robust"),
        (cfg("dpo.reference_free=true"), r"no reference-free mode"),
        (cfg(f"reference.checkpoint={tmp_path}"), r"drop reference.checkpoint"),
        (cfg(prefix=packed), r"packed pair data.*chat.pack=false"),
        (cfg("data.prefix=null"), r"no preference data"),
        (cfg("hf.model=null"), r"engine=hf needs hf.model"),
        (cfg("parallel.tp=2"), r"data parallel only"),
        (cfg("optim.warmup_steps=3"), r"optim.warmup_steps=3 must be smaller"),
    ]
    for c, match in cases:
        with pytest.raises(ConfigError, match=match):
            run(c)
    assert not (tmp_path / "r").exists()  # nothing written
    (tmp_path / "r" / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "r" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match=r"checkpoint-1.*resume=never"):
        run(cfg("resume=never"))
