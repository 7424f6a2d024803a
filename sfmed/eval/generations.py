"""Generations files: JSONL, one ``{"id": ..., "output": ...}`` per item.

Users often generate elsewhere; every task scores such a file the same way it scores answers it
generated itself (which it also writes in this shape, so a run can be re-scored without a model).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from sfmed.core.atomic import atomic_file
from sfmed.eval.items import DataError, Problems


def read_generations(path: str | Path, ids: Sequence[str], problems: Problems) -> dict[str, str]:
    """Outputs by id for the items ``ids``; a missing id is a data problem naming file and id."""
    p = Path(path)
    got = read_all_generations(p)
    wanted = set(ids)
    for i in ids:
        if i not in got:
            problems.report(f"{p}: no output for item id {i!r}")
    extra = [k for k in got if k not in wanted]
    if extra and len(extra) == len(got):
        raise DataError(
            f"{p}: none of its ids match the data (e.g. {extra[0]!r} vs {next(iter(ids), None)!r}); "
            "ids are the data's own ids, else 0-based positions (see docs/evaluation.md)"
        )
    return {i: got[i] for i in ids if i in got}


def read_all_generations(path: str | Path) -> dict[str, str]:
    """Every ``id → output`` of a generations file, checked line by line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"generations file {p} does not exist")
    got: dict[str, str] = {}
    for lineno, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p} line {lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(r, dict) or "id" not in r or "output" not in r:
            raise DataError(f"{p} line {lineno}: each line needs 'id' and 'output'")
        if not isinstance(r["output"], str):
            raise DataError(f"{p} line {lineno}: 'output' must be a string")
        key = str(r["id"])
        if key in got:
            raise DataError(f"{p} line {lineno}: duplicate id {key!r}")
        got[key] = r["output"]
    return got


def write_generations(path: str | Path, ids: Sequence[str], outputs: Sequence[str]) -> None:
    """Write ``{"id", "output"}`` lines in item order, atomically."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        for i, o in zip(ids, outputs, strict=True):
            f.write(json.dumps({"id": i, "output": o}, ensure_ascii=False) + "\n")
