"""The pipeline's plan, manifest, skip/resume/invalidation rules and Slurm chaining, with fast
fake stages (each a short Python child that writes ``done.json``) in place of the real ones."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from sfmed.config.pipeline import PipelineConfig, RecipeConfig, StageConfig
from sfmed.core.errors import ConfigError, UserError
from sfmed.pipeline import stages as registry
from sfmed.pipeline.app import run_pipeline
from sfmed.pipeline.manifest import Manifest
from sfmed.pipeline.plan import make_plan
from sfmed.pipeline.stages.base import StageContext, StageKind

# Writes <out>/done.json with its args, appends the stage name to <log>; "fail" in the args exits 1
FAKE = """
import json, pathlib, sys
out, log, args = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
with open(log, "a") as f:
    f.write(out.name + "\\n")
if "fail" in args:
    sys.exit(1)
out.mkdir(parents=True, exist_ok=True)
(out / "done.json").write_text(json.dumps(args))
"""


class FakeStage(StageKind):
    def __init__(self, kind, log: Path, training=False):
        self.kind, self.log, self.training = kind, log, training
        self.roles = {"src": "src"}

    def owned_args(self, ctx: StageContext) -> list[str]:
        return [f"src={ctx.input('src')}"] if ctx.input("src") else []

    def command(self, ctx, args):
        return ["-c", FAKE, str(ctx.out), str(self.log), *args]

    def is_complete(self, out, args):
        return (out / "done.json").is_file()

    def result(self, out, args):
        return {"args": len(args)}


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    log = tmp_path / "ran.txt"
    for kind, training in (("synthetic", False), ("convert", False), ("sft", True)):
        monkeypatch.setitem(registry._REGISTRY, kind, FakeStage(kind, log, training))
    return log


def _cfg(tmp_path, a_args=(), b_args=(), c_args=(), **kw) -> PipelineConfig:
    stages = {
        "a": StageConfig(kind="synthetic", args=list(a_args)),
        "b": StageConfig(kind="convert", inputs={"src": "a"}, args=list(b_args)),
        "c": StageConfig(kind="sft", inputs={"src": "b"}, args=list(c_args)),
    }
    return PipelineConfig(
        recipe=RecipeConfig(name="t", stages=stages), out_dir=str(tmp_path / "run"), **kw
    )


def _run(cfg) -> tuple[int, list[str]]:
    lines: list[str] = []
    rc = run_pipeline(cfg, [], lambda *a: None, echo=lines.append)
    return rc, lines


def _ran(log: Path) -> list[str]:
    return log.read_text().split() if log.is_file() else []


def test_runs_in_order_then_skips_everything(tmp_path, fakes):
    rc, _ = _run(_cfg(tmp_path))
    assert rc == 0 and _ran(fakes) == ["a", "b", "c"]
    man = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert man["recipe"] == "t" and man["sfmed_version"]
    for name in "abc":
        rec = man["stages"][name]
        assert rec["status"] == "complete" and rec["seconds"] >= 0 and rec["attempts"] == 1
        assert rec["output"] == str(tmp_path / "run" / name) and len(rec["key"]) == 16
    # b's input is a's output, with a's key
    assert man["stages"]["b"]["inputs"]["src"] == {
        "stage": "a", "path": str(tmp_path / "run" / "a"), "key": man["stages"]["a"]["key"]
    }  # fmt: skip
    assert (tmp_path / "run" / "summary.md").is_file()
    rc, lines = _run(_cfg(tmp_path))
    assert rc == 0 and _ran(fakes) == ["a", "b", "c"]  # nothing ran again
    assert all("skip" in line for line in lines[1:4]), lines


def test_changed_config_invalidates_dependents_and_says_so_first(tmp_path, fakes):
    _run(_cfg(tmp_path))
    (tmp_path / "run" / "c" / "old-checkpoint").write_text("x")
    rc, lines = _run(_cfg(tmp_path, b_args=["lr=2"]))
    assert rc == 0 and _ran(fakes) == ["a", "b", "c", "b", "c"]
    plan = {line.split()[0]: line for line in lines[1:4]}
    assert "skip" in plan["a"]
    assert "rerun" in plan["b"] and "config changed (+lr=2)" in plan["b"]
    assert "rerun" in plan["c"] and "upstream b reruns" in plan["c"]
    first_run = next(i for i, line in enumerate(lines) if line.startswith("[b] rerun"))
    assert first_run > 3  # the plan was printed before anything ran
    assert not (tmp_path / "run" / "c" / "old-checkpoint").exists()  # stale output discarded


def test_failed_stage_stops_the_run_and_reruns_alone(tmp_path, fakes):
    rc, lines = _run(_cfg(tmp_path, b_args=["fail"]))
    assert rc == 1 and _ran(fakes) == ["a", "b"]
    assert any("stage b failed (exit code 1)" in line for line in lines)
    man = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert man["stages"]["b"]["status"] == "failed" and "c" not in man["stages"]
    # same config again: a is skipped, b runs again (same key, not complete)
    rc, lines = _run(_cfg(tmp_path, b_args=["fail"]))
    assert rc == 1 and _ran(fakes) == ["a", "b", "b"]
    assert "failed; runs again" in lines[2]
    rc, _ = _run(_cfg(tmp_path))
    assert rc == 0 and _ran(fakes) == ["a", "b", "b", "b", "c"]
    man = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert man["stages"]["b"]["attempts"] == 3


def test_interrupted_training_stage_resumes(tmp_path, fakes):
    cfg = _cfg(tmp_path)
    _run(cfg)
    man = Manifest(cfg.out_dir, "t")
    man.update("c", status="interrupted")
    (tmp_path / "run" / "c" / "done.json").unlink()  # as after a kill: not complete
    plan = make_plan(cfg, Manifest(cfg.out_dir, "t"))
    assert [s.action for s in plan.stages] == ["skip", "skip", "resume"]
    assert "resumes from its last checkpoint" in plan["c"].reason
    assert not plan["c"].discard  # the checkpoint it resumes from is kept


def test_finished_after_record_is_reconciled(tmp_path, fakes):
    cfg = _cfg(tmp_path)
    _run(cfg)
    Manifest(cfg.out_dir, "t").update("c", status="submitted", result=None)
    rc, lines = _run(cfg)
    assert rc == 0 and _ran(fakes) == ["a", "b", "c"]
    assert "finished after the manifest said submitted" in lines[3]
    man = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert man["stages"]["c"]["status"] == "complete" and man["stages"]["c"]["result"]


def test_output_without_record_is_discarded(tmp_path, fakes):
    (tmp_path / "run" / "a").mkdir(parents=True)
    (tmp_path / "run" / "a" / "stray").write_text("x")
    rc, lines = _run(_cfg(tmp_path))
    assert rc == 0 and "output without a manifest record" in lines[1]
    assert not (tmp_path / "run" / "a" / "stray").exists()


def test_external_input_change_reruns(tmp_path, fakes):
    src = tmp_path / "raw" / "corpus.jsonl"
    src.parent.mkdir()
    src.write_text("one\n")
    _run(_cfg(tmp_path, a_args=[f"input={src}"]))
    src.write_text("one\ntwo\n")
    rc, lines = _run(_cfg(tmp_path, a_args=[f"input={src}"]))
    assert "inputs changed" in lines[1] and str(src) in lines[1]
    assert _ran(fakes) == ["a", "b", "c", "a", "b", "c"]


def test_subset_needs_complete_upstream(tmp_path, fakes):
    with pytest.raises(UserError, match="stage c needs b, which is not complete"):
        _run(_cfg(tmp_path, stages=["c"]))
    assert _ran(fakes) == []
    _run(_cfg(tmp_path, stages=["a", "b"]))
    assert _ran(fakes) == ["a", "b"]
    rc, lines = _run(_cfg(tmp_path, c_args=["x=1"], stages=["c"]))
    assert rc == 0 and _ran(fakes) == ["a", "b", "c"]
    # a subset that reruns b leaves c out of date, and says so
    rc, lines = _run(_cfg(tmp_path, b_args=["y=1"], c_args=["x=1"], stages=["b"]))
    assert any("out of date after this run (not in stages=): c" in line for line in lines)


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ({"a": StageConfig(kind="bogus")}, "kind='bogus' is not one of"),
        ({"a": StageConfig(kind="convert", inputs={"src": "z"})}, "not a stage of the recipe"),
        (
            {"a": StageConfig(kind="convert", inputs={"src": "b"}), "b": StageConfig(kind="sft")},
            "which is a later stage",
        ),
        ({"a b": StageConfig(kind="convert")}, "a stage name is a folder name"),
        ({}, "has no stages"),
    ],
)
def test_bad_recipes_are_refused(tmp_path, stages, match):
    with pytest.raises(ConfigError, match=match):
        PipelineConfig(recipe=RecipeConfig(name="t", stages=stages), out_dir=str(tmp_path))


def test_bad_settings_are_refused(tmp_path, fakes):
    with pytest.raises(ConfigError, match="launcher='ssh' is not one of"):
        _cfg(tmp_path, launcher="ssh")
    with pytest.raises(ConfigError, match=r"stages=\['z'\]"):
        _cfg(tmp_path, stages=["z"])
    with pytest.raises(ConfigError, match="sets \\['src=/x'\\], which the pipeline sets"):
        _run(_cfg(tmp_path, b_args=["src=/x"]))
    with pytest.raises(ConfigError, match="inputs has \\['model'\\]"):
        cfg = _cfg(tmp_path)
        cfg.recipe.stages["b"].inputs = {"model": "a"}
        _run(cfg)
    other = PipelineConfig(
        recipe=RecipeConfig(name="u", stages={"a": StageConfig(kind="synthetic")}),
        out_dir=str(tmp_path / "run"),
    )
    _run(_cfg(tmp_path))
    with pytest.raises(UserError, match="holds a run of recipe 't', not 'u'"):
        _run(other)


def test_slurm_chain_with_afterok(tmp_path, fakes, monkeypatch):
    """launcher=slurm: one sbatch per stage, each after the previous, then the summary job."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    sbatch = bindir / "sbatch"
    calls = tmp_path / "sbatch.jsonl"
    sbatch.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"p = {str(calls)!r}\n"
        "n = sum(1 for _ in open(p)) if os.path.exists(p) else 0\n"
        "env = {k: os.environ[k] for k in ('SFMED_NPROC_PER_NODE',) if k in os.environ}\n"
        "open(p, 'a').write(json.dumps({'argv': sys.argv[1:], 'env': env}) + '\\n')\n"
        "print(f'{100 + n};cluster')\n"
    )
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    cfg = _cfg(tmp_path, launcher="slurm")
    cfg.recipe.stages["c"].nproc_per_node = 4
    cfg.recipe.stages["c"].nodes = 2
    rc, lines = _run(cfg)
    assert rc == 0
    jobs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(jobs) == 4  # a, b, c and the summary
    deps = [next((a for a in j["argv"] if a.startswith("--dependency")), None) for j in jobs]
    assert deps == [None, "--dependency=afterok:100", "--dependency=afterok:101",
                    "--dependency=afterok:102"]  # fmt: skip
    train = jobs[2]["argv"]
    assert any(a.endswith("launch/slurm/train.sbatch") for a in train)
    assert "--nodes=2" in train and "--gpus-per-node=8" in train
    assert jobs[2]["env"]["SFMED_NPROC_PER_NODE"] == "4"
    assert any(a.startswith("--wrap=") for a in jobs[0]["argv"])
    assert "launcher=local" in jobs[3]["argv"][-1]
    man = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert [man["stages"][s]["job_id"] for s in "abc"] == ["100", "101", "102"]
    assert all(man["stages"][s]["status"] == "submitted" for s in "abc")


def test_output_outside_the_run_folder_is_not_an_input(tmp_path, fakes):
    """A stage writing outside out_dir (e.g. data/indexed for a blend) is not rerun because its
    own output changed."""
    cfg = _cfg(tmp_path)
    cfg.recipe.stages["a"].output = str(tmp_path / "indexed")
    cfg.recipe.stages["a"].args = [f"output_dir={tmp_path / 'indexed'}"]
    rc, _ = _run(cfg)
    assert rc == 0 and (tmp_path / "indexed" / "done.json").is_file()
    rc, lines = _run(cfg)
    assert rc == 0 and "skip" in lines[1] and _ran(fakes) == ["indexed", "b", "c"]


def test_extra_args_come_after_args_and_count_as_config(tmp_path, fakes):
    cfg = _cfg(tmp_path, c_args=["steps=1"])
    _run(cfg)
    cfg.recipe.stages["c"].extra_args = ["steps=2"]
    plan = make_plan(cfg, Manifest(cfg.out_dir, "t"))
    assert plan["c"].args[:2] == ["steps=1", "steps=2"]  # the later value wins in Hydra
    assert plan["c"].action == "rerun" and "+steps=2" in plan["c"].reason
