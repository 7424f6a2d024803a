"""``evaluate``: the report tables (``launch/evaluate.py suite=...``) for the recipe's models,
or one task (``task=<name>`` in the stage's args, e.g. ``reference_metrics`` or
``drug_indication``) on the model of its ``model`` input.

Without ``suite=`` or ``task=`` the stage writes a suite YAML (models x data sets) next to its output folder and points
``launch/evaluate.py`` at it through Hydra's search path, so the stage runs the same entry and
suite code as a hand-written ``suite=<name>``.
"""

from __future__ import annotations

from pathlib import Path

from sfmed.core.errors import ConfigError
from sfmed.pipeline.stages import register_stage
from sfmed.pipeline.stages.base import StageContext, StageKind, arg_value, read_json

SUITE = "pipeline_suite"
DATA_ROLES = {"mcq": "mcq", "qa": "qa"}  # role -> suite data-set kind


class EvaluateStage(StageKind):
    """Roles: ``model`` (HF folder, "ours"), ``baseline`` (HF folder, optional), and data sets
    ``mcq`` / ``qa`` (JSONL files, sfmed's ``jsonl`` formats)."""

    kind = "evaluate"
    entry = "launch/evaluate.py"
    roles = {"model": "suite.models", "baseline": "suite.models", "mcq": "suite.datasets",
             "qa": "suite.datasets"}  # fmt: skip

    def _task(self, ctx: StageContext) -> str | None:
        task = arg_value([*ctx.cfg.args, *ctx.cfg.extra_args], "task")
        if task and arg_value([*ctx.cfg.args, *ctx.cfg.extra_args], "suite"):
            raise ConfigError(
                f"recipe.stages.{ctx.name}.args set both task= and suite=; give one (a suite "
                "runs its own tasks)"
            )
        return task

    def conf_dir(self, ctx: StageContext) -> Path:
        """Where the stage's suite YAML is written (a sibling of its output folder)."""
        return ctx.out.parent / f".{ctx.out.name}.conf"

    def files(self, ctx: StageContext) -> dict[Path, str]:
        """The suite YAML: models and data sets from the stage's inputs (none when the stage
        names its own ``suite=``)."""
        if arg_value(ctx.cfg.args, "suite") or self._task(ctx):
            return {}
        if not ctx.input("model"):
            raise ConfigError(f"recipe.stages.{ctx.name} needs inputs.model=<export stage>")
        datasets = [(r, ctx.input(r)) for r in DATA_ROLES if ctx.input(r)]
        if not datasets:
            raise ConfigError(f"recipe.stages.{ctx.name} needs inputs.mcq and/or inputs.qa")
        models = [f"    - {{name: final, model: '{ctx.input('model')}'}}"]
        if ctx.input("baseline"):
            models.append(f"    - {{name: base, model: '{ctx.input('baseline')}'}}")
        lines = [
            "# @package _global_",
            f"# written by launch/pipeline.py for stage {ctx.name}",
            "suite:",
            f"  name: {ctx.name}",
            "  models:",
            *models,
            "  datasets:",
            *[
                f"    - {{name: {r}, kind: {DATA_ROLES[r]}, data: '{p}', format: jsonl}}"
                for r, p in datasets
            ],  # fmt: skip
        ]
        return {self.conf_dir(ctx) / "suite" / f"{SUITE}.yaml": "\n".join(lines) + "\n"}

    def owned_args(self, ctx: StageContext) -> list[str]:
        task = self._task(ctx)
        if task:
            # One task scores one model: its data and settings are the stage's own args.
            other = sorted(set(ctx.cfg.inputs) - {"model"})
            if other:
                raise ConfigError(
                    f"recipe.stages.{ctx.name} runs task={task} on one model; its inputs take "
                    f"only 'model', not {other} (name its data with data=... in its args)"
                )
            model = [f"model={ctx.input('model')}"] if ctx.input("model") else []
            return [*model, f"output_dir={ctx.out}", "overwrite=true"]
        if arg_value(ctx.cfg.args, "suite"):
            # A named suite (conf/eval/suite/): the model under test is its first model.
            model = [f"suite.models.0.model={ctx.input('model')}"] if ctx.input("model") else []
            return [*model, f"output_dir={ctx.out}", "overwrite=true"]
        return [
            f"hydra.searchpath=[file://{self.conf_dir(ctx).resolve()}]",
            f"suite={SUITE}",
            f"output_dir={ctx.out}",
            "overwrite=true",
        ]

    def describe(self, args: list[str]) -> str:
        task, suite = arg_value(args, "task"), arg_value(args, "suite")
        return f"task={task}" if task else f"suite={suite}" if suite != SUITE else "suite (inputs)"

    def is_complete(self, out: Path, args: list[str]) -> bool:
        # Written last: a suite's report.json, a single task's <task>.json.
        return read_json(out / f"{arg_value(args, 'task') or 'report'}.json") is not None

    def result(self, out: Path, args: list[str]) -> dict:
        md = out / f"{arg_value(args, 'task') or 'report'}.md"
        return {"report": str(md)} if md.is_file() else {}


register_stage(EvaluateStage())
