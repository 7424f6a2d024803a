"""A checkpoint written by an older sfmed (before model families and recipes) resumes and trains.

The fixture (tests/fixtures/pretrain_v0, see its README) holds the step-4 checkpoint of a 6-step
run of the old trainer — its ``sfmed.json`` has ``"kind": "pretrain"`` and an ``arch`` without a
``family`` — and that run's own metrics for all 6 steps. Resuming it with today's trainer must
reproduce the old run's steps 5 and 6 exactly (same data order, RNG, optimizer state).
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from conftest import REPO

pytestmark = [pytest.mark.dist, pytest.mark.slow]

FIXTURE = REPO / "tests" / "fixtures" / "pretrain_v0"


def _old_overrides() -> list[str]:
    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURE / "make_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # The old run saved only step 4; this one also saves its end, to check the new metadata.
    return [o for o in mod.OVERRIDES if not o.startswith("train.save_final=")]


def test_old_pretrain_checkpoint_resumes_and_matches_the_old_run(torchrun, tmp_path):
    old_meta = json.loads((FIXTURE / "run" / "iter_0000004" / "sfmed.json").read_text())
    assert old_meta["origin"]["kind"] == "pretrain" and "family" not in old_meta["arch"]
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    proc = torchrun(
        REPO / "launch" / "pretrain.py",
        *_old_overrides(),
        f"data.prefix={FIXTURE / 'corpus_text_document'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"ckpt_dir={run}",
        "logging.level=INFO",
        nproc=1,
    )
    out = proc.stdout + proc.stderr
    assert f"resumed from {run}/iter_0000004: step 4, 16 samples consumed" in out, out[-3000:]
    ref = {r["step"]: r for r in map(json.loads, (FIXTURE / "reference_metrics.jsonl").open())}
    got = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").open())}
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        for key in ("loss", "grad_norm", "lr", "consumed_samples", "tokens"):
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])
    new_meta = json.loads((run / "iter_0000006" / "sfmed.json").read_text())
    assert new_meta["origin"]["kind"] == "pretrain" and new_meta["iteration"] == 6
    assert new_meta["arch"]["family"] == "qwen2"
    assert {k: new_meta["arch"][k] for k in old_meta["arch"]} == old_meta["arch"]
    assert json.loads((run / "status.json").read_text())["status"] == "complete"
