"""Compare the per-step records of two runs (the parity gate between the engines).

``python -m sfmed.hf_engine.parity RUN_A RUN_B [--rtol 1e-4]`` prints the steps both runs
logged with their loss, grad norm and (DPO runs) reward margin and exits 1 when any differs by
more than ``rtol`` (relative), e.g. a sharded run and an HF-engine run of the same model, data
and settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = ("loss", "grad_norm", "rewards/margins")
"""Compared per step; a key neither run logs (``rewards/margins`` of SFT runs) is skipped."""


def read_metrics(run_dir: str | Path) -> dict[int, dict]:
    """step -> record of ``<run_dir>/metrics.jsonl`` (lines cut by a crash are skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in r and "step" in r:
            out[int(r["step"])] = r
    return out


def compare_runs(a: str | Path, b: str | Path, rtol: float = 1e-4) -> tuple[list[dict], list[dict]]:
    """(rows, failures): per common step, both runs' :data:`KEYS` and their relative
    difference; failures are the rows beyond ``rtol`` or steps only one run logged."""
    ra, rb = read_metrics(a), read_metrics(b)
    rows, failures = [], []
    for step in sorted(set(ra) | set(rb)):
        if step not in ra or step not in rb:
            failures.append({"step": step, "missing": "a" if step not in ra else "b"})
            continue
        row = {"step": step}
        bad = False
        for k in KEYS:
            x, y = ra[step].get(k), rb[step].get(k)
            if x is None or y is None:
                rel = None if x is None and y is None else float("inf")
            else:
                rel = abs(x - y) / max(abs(y), 1e-12)
            row.update({f"{k}_a": x, f"{k}_b": y, f"{k}_rel": rel})
            bad |= rel is not None and not rel <= rtol
        rows.append(row)
        if bad:
            failures.append(row)
    return rows, failures


def _num(x) -> str:
    return "-" if x is None else f"{x:.6f}"


def main(argv: list[str] | None = None) -> int:
    """Print the comparison; 0 when the runs agree, 1 when not."""
    p = argparse.ArgumentParser(prog="python -m sfmed.hf_engine.parity", description=__doc__)
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--rtol", type=float, default=1e-4)
    args = p.parse_args(argv)
    for r in (args.run_a, args.run_b):
        if not (Path(r) / "metrics.jsonl").is_file():
            p.error(f"{r} has no metrics.jsonl")
    rows, failures = compare_runs(args.run_a, args.run_b, args.rtol)
    keys = [k for k in KEYS if any(r[f"{k}_a"] is not None for r in rows)]
    print(" | ".join(["step", *(f"{k} a | {k} b | rel" for k in keys)]))
    for r in rows:
        cells = [str(r["step"])]
        for k in keys:
            rel = r[f"{k}_rel"]
            cells += [_num(r[f"{k}_a"]), _num(r[f"{k}_b"]), "-" if rel is None else f"{rel:.1e}"]
        print(" | ".join(cells))
    ok = not failures and rows
    print(
        f"{'agree' if ok else 'DIFFER'}: {len(rows)} steps, {len(failures)} beyond rtol={args.rtol}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
