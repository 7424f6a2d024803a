"""``synthetic``: the tiny recipe's model, tokenizer and corpora made on the spot."""

from __future__ import annotations

from pathlib import Path

from sfmed.core.errors import ConfigError
from sfmed.pipeline.stages import register_stage
from sfmed.pipeline.stages.base import StageContext, StageKind, arg_value, read_json
from sfmed.pipeline.synthetic import FILES, MARKER


class SyntheticStage(StageKind):
    """Writes ``hf/`` (tiny Qwen2 + ChatML tokenizer) and ``corpora/*.jsonl``; args: ``seed=N``."""

    kind = "synthetic"

    def owned_args(self, ctx: StageContext) -> list[str]:
        return []

    def command(self, ctx: StageContext, args: list[str]) -> list[str]:
        seed = arg_value(args, "seed") or "0"
        return ["-m", "sfmed.pipeline.synthetic", str(ctx.out), seed]

    def is_complete(self, out: Path, args: list[str]) -> bool:
        return read_json(out / MARKER) is not None

    def output(self, out: Path, args: list[str], item: str | None) -> str:
        if item == "hf":
            return str(out / "hf")
        if item in FILES:
            return str(out / "corpora" / FILES[item])
        raise ConfigError(
            f"a synthetic stage gives 'hf' or a corpus {sorted(FILES)}; got {item!r} (write "
            "e.g. assets:hf)"
        )


register_stage(SyntheticStage())
