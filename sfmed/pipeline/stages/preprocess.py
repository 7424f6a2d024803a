"""``preprocess``: corpora -> indexed datasets (``launch/preprocess.py``, any ``format=``)."""

from __future__ import annotations

from pathlib import Path

from sfmed.core.errors import ConfigError
from sfmed.pipeline.stages import register_stage
from sfmed.pipeline.stages.base import StageContext, StageKind, arg_value, read_json

SUFFIX = {"pretrain": "_text_document", "sft": "_sft", "preference": "_preference"}
REPORT = {
    "pretrain": "report.json",
    "sft": "sft_report.json",
    "preference": "preference_report.json",
}


def _format(args: list[str]) -> str:
    return arg_value(args, "format") or "pretrain"


def _sources(args: list[str]) -> list[str]:
    """The source names the stage writes: ``name=`` (one input) or ``sources=[...]``."""
    srcs = arg_value(args, "sources")
    if srcs:
        return [s.strip() for s in srcs.strip("[]").split(",") if s.strip()]
    name = arg_value(args, "name")
    if name:
        return [name]
    inp = arg_value(args, "input")
    return [Path(inp).name.split(".")[0]] if inp else []


class PreprocessStage(StageKind):
    """Input roles ``input`` (a file) and ``tokenizer`` (a folder); gives the dataset prefix."""

    kind = "preprocess"
    entry = "launch/preprocess.py"
    config_name = "preprocess"
    schema = "sfmed.config.data:PreprocessConfig"
    roles = {"input": "input", "tokenizer": "tokenizer"}

    def owned_args(self, ctx: StageContext) -> list[str]:
        own = [f"output_dir={ctx.out}"]
        for role in ("input", "tokenizer"):
            if ctx.input(role):
                own.append(f"{role}={ctx.input(role)}")
        return own

    def is_complete(self, out: Path, args: list[str]) -> bool:
        fmt = _format(args)
        report = read_json(out / REPORT.get(fmt, "report.json"))
        if report is None:
            return False
        return all(Path(self.output(out, args, s) + ".idx").is_file() for s in _sources(args))

    def output(self, out: Path, args: list[str], item: str | None) -> str:
        sources = _sources(args)
        if item is None:
            if len(sources) != 1:
                raise ConfigError(
                    f"a preprocess stage with sources {sources} has several outputs; name one "
                    "(e.g. prep:<source>)"
                )
            item = sources[0]
        return str(out / f"{item}{SUFFIX.get(_format(args), '_text_document')}")

    def describe(self, args: list[str]) -> str:
        fmt = _format(args)
        if fmt == "pretrain":
            return "format=pretrain"
        return f"format={fmt}, chat.template={arg_value(args, 'chat.template') or 'auto'}"

    def result(self, out: Path, args: list[str]) -> dict:
        report = read_json(out / REPORT.get(_format(args), "report.json")) or {}
        total = report.get("total") or report.get("totals") or {}
        return {"tokens": total.get("tokens")} if isinstance(total, dict) else {}


register_stage(PreprocessStage())
