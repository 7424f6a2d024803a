"""What every stage kind provides to the plan and the runners."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sfmed.config.pipeline import StageConfig
from sfmed.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]


@dataclass
class Upstream:
    """An earlier stage as a later one sees it: its kind object, output folder and args."""

    name: str
    kind: StageKind
    out: Path
    args: list[str]

    def output(self, item: str | None) -> str:
        """The path this stage gives to a later stage (``item`` selects one of several)."""
        return self.kind.output(self.out, self.args, item)


@dataclass
class StageContext:
    """Everything a stage kind needs to build its command."""

    name: str
    cfg: StageConfig
    out: Path
    inputs: dict[str, tuple[Upstream, str | None]] = field(default_factory=dict)
    device: str = "auto"

    def input(self, role: str) -> str | None:
        """The path filling ``role``, or None when the recipe does not give it."""
        if role not in self.inputs:
            return None
        up, item = self.inputs[role]
        return up.output(item)


def arg_value(args: list[str], key: str) -> str | None:
    """The value ``key=...`` has in a Hydra override list (the last one), else None."""
    val = None
    for a in args:
        k, sep, v = a.lstrip("+~").partition("=")
        if sep and k == key:
            val = v
    return val


class StageKind:
    """A kind of stage (convert, sft, ...): how it runs, what complete means, what it outputs.

    ``args`` are the stage's entry-point overrides; the kind adds the ones it owns (output
    folder, upstream paths) and refuses recipe args that set those.
    """

    kind = ""
    entry: str | None = None  # launch/<x>.py, relative to the repository root
    training = False
    roles: dict[str, str] = {}  # role -> the override it sets (docs list them)
    config_name: str | None = None  # the entry's primary config under conf/ (None: not composed)
    schema: str | None = None  # "module:Class" of the entry's schema (module has register())

    def owned_args(self, ctx: StageContext) -> list[str]:
        """Overrides the pipeline sets for this stage (output folder, upstream paths)."""
        raise NotImplementedError

    def args(self, ctx: StageContext) -> list[str]:
        """The full override list: the recipe's args, then the pipeline's own."""
        unknown = sorted(set(ctx.cfg.inputs) - set(self.roles))
        if unknown:
            raise ConfigError(
                f"recipe.stages.{ctx.name}.inputs has {unknown}; a {self.kind} stage takes "
                f"{sorted(self.roles)}"
            )
        own = self.owned_args(ctx)
        owned = {a.lstrip("+").partition("=")[0] for a in own}
        given = [*ctx.cfg.args, *ctx.cfg.extra_args]
        clash = [a for a in given if a.lstrip("+~").partition("=")[0] in owned]
        if clash:
            raise ConfigError(
                f"recipe.stages.{ctx.name}.args sets {clash}, which the pipeline sets from the "
                "stage's output folder and inputs; drop them"
            )
        return [*given, *own]

    def command(self, ctx: StageContext, args: list[str]) -> list[str]:
        """The command line after ``python`` (or torchrun) that runs the stage."""
        return [str(REPO / self.entry), *args]

    def local_prefix(self, nproc_per_node: int) -> list[str]:
        """What goes between ``python`` and the command on a local run (e.g. torchrun)."""
        return []

    def files(self, ctx: StageContext) -> dict[Path, str]:
        """Files the stage needs written before it runs (part of its config hash)."""
        return {}

    def is_complete(self, out: Path, args: list[str]) -> bool:
        """True when ``out`` holds this stage's complete output."""
        raise NotImplementedError

    def output(self, out: Path, args: list[str], item: str | None) -> str:
        """What a later stage gets from this one (default: the output folder)."""
        if item:
            raise ConfigError(f"a {self.kind} stage has one output; drop ':{item}'")
        return str(out)

    def result(self, out: Path, args: list[str]) -> dict:
        """The stage's final numbers for the manifest and the summary."""
        return {}

    def describe(self, args: list[str]) -> str:
        """What the plan line says the stage does besides its kind (engine, format, task)."""
        return ""


def python() -> str:
    """The interpreter that runs the stages (this one)."""
    return sys.executable


def read_json(path: Path) -> dict | None:
    """``path`` parsed, or None when missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
