"""The seed systems' recipes (QiZhenGPT, DISC-MedLLM, ChiMed-GPT) through the real entry point
with ``dry_run=true``, and the generic stage features they use: an ``engine=hf`` training stage
that starts from an HF folder and hands its exported folder on, and an evaluation stage that
runs one task."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from sfmed.config.pipeline import PipelineConfig, RecipeConfig, StageConfig
from sfmed.core.errors import ConfigError
from sfmed.pipeline.manifest import Manifest
from sfmed.pipeline.plan import make_plan
from sfmed.pipeline.stages import get_stage


def _dry_run(recipe: str, out: Path) -> list[list[str]]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    p = subprocess.run(
        [sys.executable, str(REPO / "launch/pipeline.py"), f"recipe={recipe}", "dry_run=true",
         f"out_dir={out}"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "dry run: nothing was run" in p.stdout
    assert not out.exists() or not any(out.iterdir())
    rows = []
    for ln in p.stdout.splitlines()[1:]:
        if not ln.startswith("  ") or ln.startswith("  note"):
            break
        name, kind, *rest = ln.split()
        desc = ln.partition("[")[2].rstrip("]") if ln.endswith("]") else ""
        rows.append([name, kind, desc])
    return rows


# (stage, kind, what the plan line says besides the kind): from the papers / READMEs.
EXPECTED = {
    "qizhen_llama_lora": [
        ["prep_sft", "preprocess", "format=sft, chat.template=chinese_alpaca"],
        ["sft", "sft", "engine=hf, LoRA"],
        ["evaluate", "evaluate", "task=drug_indication"],
    ],
    "disc_medllm_baichuan13b": [
        ["convert", "convert", ""],
        ["prep_sft", "preprocess", "format=sft, chat.template=baichuan"],
        ["sft", "sft", "engine=mcore"],
        ["prep_behavior", "preprocess", "format=sft, chat.template=baichuan"],
        ["prep_general", "preprocess", "format=sft, chat.template=baichuan"],
        ["sft_behavior", "sft", "engine=mcore"],
        ["export", "export", ""],
        ["evaluate", "evaluate", "task=consultation"],
    ],
    "chimed_ziya13b": [
        ["convert", "convert", ""],
        ["prep_cpt", "preprocess", "format=pretrain"],
        ["cpt", "pretrain", "engine=mcore"],
        ["prep_sft", "preprocess", "format=sft, chat.template=chimed"],
        ["sft", "sft", "engine=mcore"],
        ["prep_dpo", "preprocess", "format=preference, chat.template=chimed"],
        ["dpo", "dpo", "engine=mcore"],
        ["export", "export", ""],
        ["eval_webmedqa", "evaluate", "task=reference_metrics"],
        ["eval_cmtmedqa", "evaluate", "task=reference_metrics"],
    ],
}


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_seed_recipe_dry_run_names_stages_engines_and_formats(tmp_path, recipe):
    assert _dry_run(recipe, tmp_path / "run") == EXPECTED[recipe]


def _plan(tmp_path, stages: dict[str, StageConfig]):
    cfg = PipelineConfig(
        recipe=RecipeConfig(name="r", stages=stages), out_dir=str(tmp_path / "run")
    )
    return make_plan(cfg, Manifest(tmp_path / "run", "r"))


def _prep():
    return StageConfig(kind="preprocess", args=["format=sft", "name=c", "input=c.jsonl"])


@pytest.mark.parametrize(
    ("sft_args", "ref", "folder"),
    [
        (["hf.lora.enabled=true"], "sft", "merged"),  # LoRA's default export
        (["hf.lora.enabled=true", "hf.export=both"], "sft:adapter", "adapter"),
        ([], "sft", "hf"),  # full-parameter
    ],
)
def test_hf_engine_stage_starts_from_an_hf_folder_and_hands_on_its_export(
    tmp_path, sft_args, ref, folder
):
    plan = _plan(tmp_path, {
        "prep": _prep(),
        "sft": StageConfig(kind="sft", inputs={"data": "prep"},
                           args=["engine=hf", "hf.model=models/base", *sft_args]),
        "dpo": StageConfig(kind="dpo", inputs={"model": ref, "data": "prep"}, args=["engine=hf"]),
        "eval": StageConfig(kind="evaluate", inputs={"model": ref}, args=["task=mcq", "data=x"]),
    })  # fmt: skip
    run = tmp_path / "run"
    assert f"hf.model={run / 'sft' / folder}" in plan["dpo"].args
    assert not any(a.startswith("init_from=") for a in plan["dpo"].args)
    assert f"model={run / 'sft' / folder}" in plan["eval"].args
    assert f"data.prefix={run / 'prep' / 'c_sft'}" in plan["sft"].args


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ({"sft": StageConfig(kind="sft", inputs={"init_from": "base"}, args=["engine=hf"])},
         "engine=hf stage does not take 'init_from'"),
        ({"sft": StageConfig(kind="sft", inputs={"model": "base"})},
         "engine=mcore stage does not take 'model'"),
        ({"sft": StageConfig(kind="sft", args=["engine=hf", "hf.lora.enabled=true",
                                               "hf.export=adapter"]),
          "ev": StageConfig(kind="evaluate", inputs={"model": "sft"}, args=["task=mcq"])},
         "writes only a LoRA adapter"),
        ({"sft": StageConfig(kind="sft", args=["engine=hf"]),
          "ev": StageConfig(kind="evaluate", inputs={"model": "sft:weights"}, args=["task=mcq"])},
         "not ':weights'"),
        ({"ev": StageConfig(kind="evaluate", inputs={"model": "base", "qa": "base"},
                            args=["task=reference_metrics"])},
         "its inputs take only 'model'"),
        ({"ev": StageConfig(kind="evaluate", inputs={"model": "base"},
                            args=["task=mcq", "suite=sfmed_report"])},
         "set both task= and suite="),
    ],
)  # fmt: skip
def test_wrong_stage_wiring_is_refused_naming_the_fix(tmp_path, stages, message):
    base = {"base": StageConfig(kind="convert", args=["src=models/x"])}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _plan(tmp_path, {**base, **stages})


def test_task_evaluation_writes_no_suite_and_is_complete_with_its_task_json(tmp_path):
    plan = _plan(tmp_path, {
        "sft": StageConfig(kind="sft", args=["engine=hf"]),
        "ev": StageConfig(kind="evaluate", inputs={"model": "sft"},
                          args=["task=reference_metrics", "data=qa.json", "format=cmtmedqa"]),
    })  # fmt: skip
    ev, out = plan["ev"], tmp_path / "run" / "ev"
    assert ev.files == {}
    assert ev.args[-3:] == [f"model={tmp_path / 'run' / 'sft' / 'hf'}", f"output_dir={out}",
                            "overwrite=true"]  # fmt: skip
    kind = get_stage("evaluate")
    out.mkdir(parents=True)
    (out / "report.json").write_text("{}")  # a suite's marker does not complete a task run
    assert not kind.is_complete(out, ev.args)
    (out / "reference_metrics.json").write_text("{}")
    assert kind.is_complete(out, ev.args)
