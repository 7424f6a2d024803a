"""``launch/pipeline.py`` as users call it: every recipe composes and validates, dry_run prints
the plan, the token budget and GPU-hours, and bad values exit 2 before any stage runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO


def _pipeline(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, str(REPO / "launch/pipeline.py"), *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )  # fmt: skip


def test_sfmed_qwen2_7b_dry_run_prints_budget_and_gpu_hours(tmp_path):
    p = _pipeline("recipe=sfmed_qwen2_7b", "dry_run=true", f"out_dir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    stages = [ln.split()[0] for ln in out.splitlines()[1:10]]
    assert stages == ["convert", "prep_cpt", "cpt", "prep_sft", "sft", "prep_dpo", "dpo",
                      "export", "evaluate"]  # fmt: skip
    assert "= medical" in out and "1.30B" in out and "= general" in out and "2.70B" in out
    for corpus in ("cmtmedqa", "cmexam", "wiki2019zh", "webtext2019zh", "baike2018qa"):
        assert f"  {corpus} " in out
    # CPT: 650 steps x 1024 x 4096 tokens, 6 FLOPs per parameter per token, 7.6e9 parameters,
    # 40% of 989 TFLOP/s
    cpt_hours = 6 * 7.6e9 * 650 * 1024 * 4096 / (0.40 * 989e12) / 3600
    line = next(
        ln for ln in out.splitlines() if ln.strip().startswith("cpt ") and "GPU-hours" in ln
    )
    assert f"{cpt_hours:.1f} GPU-hours" in line, line
    assert "dry run: nothing was run" in out
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    # another MFU halves... doubles the hours
    p = _pipeline("recipe=sfmed_qwen2_7b", "dry_run=true", "estimate.mfu=0.2",
                  f"out_dir={tmp_path / 'run'}")  # fmt: skip
    assert f"{2 * cpt_hours:.1f} GPU-hours" in p.stdout


def test_tiny_cpu_dry_run_lists_every_stage(tmp_path):
    p = _pipeline("recipe=tiny_cpu", "dry_run=true", f"out_dir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()[1:11]
    assert [ln.split()[:3] for ln in lines] == [
        ["assets", "synthetic", "run"], ["convert", "convert", "run"],
        ["prep_cpt", "preprocess", "run"], ["cpt", "pretrain", "x4"],
        ["prep_sft", "preprocess", "run"], ["sft", "sft", "x4"],
        ["prep_dpo", "preprocess", "run"], ["dpo", "dpo", "x4"],
        ["export", "export", "run"], ["evaluate", "evaluate", "run"],
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["launcher=ssh"], "launcher='ssh' is not one of"),
        (["stages=[nope]"], "stages=['nope']"),
        (["recipe.stages.sft.extra_args=['train.no_such_key=1']"], "stage sft:"),
        (["recipe.stages.cpt.args=['device=cpu','parallel.tp=3']"], "stage cpt:"),
        (["recipe.stages.sft.args=['ckpt_dir=/x']"], "which the pipeline sets"),
        (["recipe.stages.sft.inputs.data=nowhere"], "'nowhere', which is not a stage"),
    ],
)
def test_bad_values_exit_2_before_any_stage_runs(tmp_path, args, message):
    out = tmp_path / "run"
    p = _pipeline("recipe=tiny_cpu", f"out_dir={out}", *args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr, p.stderr
    assert p.stderr.count("pipeline: error") == 1
    assert not (out / "assets").exists()  # nothing ran
