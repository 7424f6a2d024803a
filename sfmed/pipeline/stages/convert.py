"""``convert``: an HF folder -> a Megatron checkpoint (``launch/convert.py to=mcore``)."""

from __future__ import annotations

from pathlib import Path

from sfmed.core.megatron_layout import TRACKER
from sfmed.pipeline.stages import register_stage
from sfmed.pipeline.stages.base import StageContext, StageKind


class ConvertStage(StageKind):
    """Input role ``src`` (an HF folder), or ``src=`` in the stage's args."""

    kind = "convert"
    entry = "launch/convert.py"
    config_name = "convert"
    schema = "sfmed.config.convert:ConvertConfig"
    roles = {"src": "src"}

    def owned_args(self, ctx: StageContext) -> list[str]:
        own = ["to=mcore", f"dst={ctx.out}", "overwrite=true", "progress=false"]
        if ctx.input("src"):
            own.append(f"src={ctx.input('src')}")
        return own

    def is_complete(self, out: Path, args: list[str]) -> bool:
        # The tracker is written last and atomically: present means complete.
        return (out / TRACKER).is_file()


register_stage(ConvertStage())
