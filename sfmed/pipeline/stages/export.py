"""``export``: a Megatron run or checkpoint -> an HF folder (``launch/convert.py to=hf``)."""

from __future__ import annotations

from pathlib import Path

from sfmed.pipeline.stages import register_stage
from sfmed.pipeline.stages.base import StageContext, StageKind


class ExportStage(StageKind):
    """Input role ``src`` (a run folder or checkpoint)."""

    kind = "export"
    entry = "launch/convert.py"
    config_name = "convert"
    schema = "sfmed.config.convert:ConvertConfig"
    roles = {"src": "src"}

    def owned_args(self, ctx: StageContext) -> list[str]:
        own = ["to=hf", f"dst={ctx.out}", "overwrite=true", "progress=false"]
        if ctx.input("src"):
            own.append(f"src={ctx.input('src')}")
        return own

    def is_complete(self, out: Path, args: list[str]) -> bool:
        # The HF folder appears by an atomic rename once every file is written.
        return (out / "config.json").is_file()


register_stage(ExportStage())
