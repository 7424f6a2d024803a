"""What every task shares: where answers come from, the result header, accuracy breakdowns."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sfmed
from sfmed.config.eval import EvalConfig
from sfmed.eval.backends import BackendPool, Chat, side_spec
from sfmed.eval.generations import read_generations, write_generations
from sfmed.eval.items import Problems

logger = logging.getLogger(__name__)


@dataclass
class TaskResult:
    """What a task hands back: the JSON object, the Markdown text and an optional chart writer."""

    result: dict
    markdown: str
    chart: Callable[[Path], None] | None = None


@dataclass
class RunContext:
    """Settings, the problem collector, and the answer sources of one run."""

    cfg: EvalConfig
    problems: Problems
    out_dir: Path
    sources: dict[str, dict] = field(default_factory=dict)
    generated: bool = False
    pool: BackendPool | None = None  # one engine at a time (created on first use)

    def backend(self, side: str = "", scoring: bool = False):
        """The engine of side ``''``/``'a'``/``'b'``; an equal spec reuses the loaded one."""
        if self.pool is None:
            self.pool = BackendPool(self.cfg)
        return self.pool.get(side_spec(self.cfg, side, scoring=scoring))

    def close(self) -> None:
        """Release the loaded engine, if any."""
        if self.pool is not None:
            self.pool.close()

    def side_name(self, side: str) -> str:
        """The label of side ``''``/``'a'`` (model A) or ``'b'`` in tables."""
        c = self.cfg
        if side == "b":
            return c.name_b or _stem(c.model_b or c.generations_b)
        return c.name_a or _stem(c.model or c.generations_a or c.generations or "recorded")

    def answers(self, ids: Sequence[str], chats: Sequence[Chat], side: str = "") -> dict[str, str]:
        """Outputs by id for one side: generated with its model, or read from its JSONL file.

        Generated answers are also written to ``<task>.generations[_a|_b].jsonl`` so the run can
        be re-scored without the model.
        """
        c = self.cfg
        model = c.model_b if side == "b" else c.model
        gen_file = {"": c.generations, "a": c.generations_a, "b": c.generations_b}[side]
        key = side or "model"
        if model:
            backend = self.backend(side)
            before = dict(backend.info().get("truncated", {}))
            outs = backend.generate(list(chats), c.decoding, desc=f"{c.task} {side or ''}".strip())
            suffix = f"_{side}" if side else ""
            path = self.out_dir / f"{c.task}.generations{suffix}.jsonl"
            write_generations(path, ids, outs)
            info = backend.info()
            if "truncated" in info:  # this side's prompts only (an engine can serve both sides)
                info["truncated"] = {k: v - before.get(k, 0) for k, v in info["truncated"].items()}
            self.sources[key] = {**info, "generations_written": str(path)}
            self.generated = True
            return dict(zip(ids, outs))
        self.sources[key] = {"generations": str(gen_file)}
        return read_generations(gen_file, ids, self.problems)

    def header(self, n: int, **settings) -> dict:
        """The top of every result JSON: task, data, answer sources, settings (no timestamps,
        so that the same inputs give the same file)."""
        c = self.cfg
        h = {
            "task": c.task,
            "dataset": c.dataset_name or _stem(c.data),
            "data": c.data,
            "format": c.format,
            "n": n,
            "sources": self.sources,
            "settings": {**settings, "strict": c.strict, "limit": c.limit},
        }
        if self.generated:
            h["decoding"] = asdict(c.decoding)
            h["settings"]["system_prompt"] = c.system_prompt
        h["n_skipped"] = len(self.problems.messages)
        h["skipped"] = list(self.problems.messages)
        h["sfmed_version"] = sfmed.__version__
        return h

    def limit(self, items: list) -> list:
        """The first ``cfg.limit`` items (all when unset)."""
        return items[: self.cfg.limit] if self.cfg.limit else items


def _stem(p: str | None) -> str:
    if not p:
        return "none"
    path = Path(p.rstrip("/"))
    return path.stem if path.suffix in (".json", ".jsonl", ".csv", ".txt", ".tsv") else path.name


def accuracy_table(records: Sequence[dict], key: Callable[[dict], str | None]) -> dict[str, dict]:
    """``{group: {"accuracy", "correct", "n"}}`` over records with a non-None ``key``."""
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        k = key(r)
        if k is None:
            continue
        acc[k][0] += r["score"]
        acc[k][1] += 1
    return {k: {"accuracy": c / n, "correct": c, "n": n} for k, (c, n) in sorted(acc.items())}


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean; 0 for an empty sequence."""
    return sum(xs) / len(xs) if xs else 0.0
