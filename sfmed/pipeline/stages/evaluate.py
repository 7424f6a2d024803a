"""``evaluate``: the report tables (``launch/evaluate.py suite=...``) for the recipe's models.

The stage writes a suite YAML (models x data sets) next to its output folder and points
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

    def conf_dir(self, ctx: StageContext) -> Path:
        """Where the stage's suite YAML is written (a sibling of its output folder)."""
        return ctx.out.parent / f".{ctx.out.name}.conf"

    def files(self, ctx: StageContext) -> dict[Path, str]:
        """The suite YAML: models and data sets from the stage's inputs (none when the stage
        names its own ``suite=``)."""
        if arg_value(ctx.cfg.args, "suite"):
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

    def is_complete(self, out: Path, args: list[str]) -> bool:
        return read_json(out / "report.json") is not None  # written last by the suite

    def result(self, out: Path, args: list[str]) -> dict:
        return {"report": str(out / "report.md")} if (out / "report.md").is_file() else {}


register_stage(EvaluateStage())
