"""Every GPU check of sfmed in one command, written up as one card (JSON + Markdown).

On one CUDA device, within a time budget (default 8 minutes), it runs the ``gpu``-marked tests
and the pretraining and SFT throughput benchmarks (``--quick``: the 1.5B shape and the 7B layer
shape, the best attention each machine has), plus the DPO benchmark when it is present, and
writes ``<out>/card.json`` and ``<out>/card.md``: device, driver, CUDA, torch, megatron-core,
Transformer Engine / flash-attn versions, each test's result, tokens/s and MFU under both
conventions (full attention FLOPs as Megatron-LM/PaLM count them, and causal = half).

    bash tests/gpu/run_all.sh                   # = python tests/gpu/card.py --out gpu-card
    python tests/gpu/card.py --out gpu-card --budget 600

Exit status: 0 when every test passed and every benchmark ran, 1 otherwise, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BENCH = REPO / "tests" / "benchmarks"
sys.path.insert(0, str(BENCH))

# (name, script, share of the budget): the benchmarks, in the order they run.
BENCHMARKS = [
    ("pretrain", "bench_pretrain_gpu.py", 0.40),
    ("sft", "bench_sft_gpu.py", 0.30),
    ("dpo", "bench_dpo_gpu.py", 0.20),
]
TESTS_SHARE = 0.10


def junit_results(path: Path) -> list[dict]:
    """name/outcome/seconds (and the message of a failure or skip) of each test in a JUnit XML."""
    if not path.is_file():
        return []
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        row = {
            "test": f"{case.get('classname', '')}::{case.get('name', '')}",
            "seconds": round(float(case.get("time", 0) or 0), 2),
            "outcome": "passed",
        }
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                row["outcome"] = "failed" if tag in ("failure", "error") else "skipped"
                row["message"] = (el.get("message") or "")[:300]
        out.append(row)
    return out


def _fmt_pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, int | float) else "-"


def _fmt_num(x, spec: str = ",.0f") -> str:
    return format(x, spec) if isinstance(x, int | float) else "-"


def render_markdown(card: dict) -> str:
    """The card as Markdown (what docs/benchmarks.md quotes)."""
    env = card["environment"]
    lines = [
        f"# sfmed GPU card — {env.get('device') or 'no CUDA device'}",
        "",
        f"Written {card['written']} in {card['wall_s']:.0f} s (budget {card['budget_s']} s).",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v if v is not None else '-'} |" for k, v in env.items()),
        "",
        "## Tests (`pytest -m gpu`)",
        "",
    ]
    tests = card["tests"]
    if not tests["results"]:
        lines.append(f"No test results ({tests.get('error', 'none collected')}).")
    else:
        counts = {o: sum(r["outcome"] == o for r in tests["results"]) for o in
                  ("passed", "failed", "skipped")}  # fmt: skip
        lines += [
            f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped.",
            "",
            "| test | result | s |",
            "|---|---|---:|",
        ]
        for r in tests["results"]:
            msg = f" ({r['message'][:80]})" if r.get("message") else ""
            lines.append(f"| `{r['test']}` | {r['outcome']}{msg} | {r['seconds']:.1f} |")
    lines += [
        "",
        "## Throughput (bf16, sequence 4096, one GPU)",
        "",
        "MFU counts full attention FLOPs (Megatron-LM/PaLM); MFU causal counts half of them.",
        "",
        "| stage | shape | config | tokens/s | TFLOP/s | MFU | MFU causal | mem GB | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, bench in card["benchmarks"].items():
        if "error" in bench and not bench.get("results"):
            lines.append(f"| {name} | - | - | - | - | - | - | - | {bench['error'][:100]} |")
            continue
        for r in bench.get("results", []):
            note = r.get("error", "")[:100]
            lines.append(
                f"| {name} | {r.get('shape', '-')} | {r.get('config', '-')} | "
                f"{_fmt_num(r.get('tokens_per_s'))} | {_fmt_num(r.get('tflops_per_gpu'), '.1f')} | "
                f"{_fmt_pct(r.get('mfu'))} | {_fmt_pct(r.get('mfu_causal'))} | "
                f"{_fmt_num(r.get('mem_gb'), '.1f')} | {note} |"
            )
        if bench.get("packing"):
            pk = bench["packing"]
            kind = "synthetic" if pk.get("synthetic") else "real"
            lines.append(
                f"| {name} data | {kind} conversations | packing {_fmt_pct(pk.get('packing'))}, "
                f"supervised {_fmt_pct(pk.get('supervised'))} | | | | | | |"
            )
    lines += ["", f"**Verdict: {card['verdict']}**", ""]
    return "\n".join(lines)


def verdict(card: dict) -> str:
    """``pass`` when every test passed (or skipped) and every benchmark run produced numbers."""
    bad = [r["test"] for r in card["tests"]["results"] if r["outcome"] == "failed"]
    if card["tests"].get("error"):
        bad.append("the gpu tests did not run: " + card["tests"]["error"])
    for name, bench in card["benchmarks"].items():
        if bench.get("absent"):
            continue
        if "error" in bench:
            bad.append(f"{name}: {bench['error'][:120]}")
        if bench.get("status") == 1:  # bench_pretrain_gpu.py: an MFU target was missed
            bad.append(f"{name}: an MFU target was missed (see {name}.log)")
        bad += [
            f"{name} {r.get('shape')} {r.get('config')}: {r['error'][:120]}"
            for r in bench.get("results", [])
            if "error" in r and "not installed" not in r["error"]
        ]
    return "pass" if not bad else "FAIL — " + "; ".join(bad)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _run(cmd: list[str], timeout: float, log: Path) -> str | None:
    """Run ``cmd`` with its output in ``log``; None, or why it did not finish cleanly."""
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                  timeout=max(timeout, 30))  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout:.0f} s (log: {log.name})"
    return None if proc.returncode == 0 else f"exit {proc.returncode} (log: {log.name})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="gpu-card", help="folder for card.json, card.md and logs")
    ap.add_argument("--budget", type=int, default=480, help="seconds for everything (default 480)")
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("tests/gpu/card.py needs a CUDA device (torch.cuda.is_available() is False)",
              file=sys.stderr)  # fmt: skip
        return 2
    from gpu_common import environment

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    card: dict = {"environment": environment(), "budget_s": a.budget, "benchmarks": {}}

    junit = out / "gpu-tests.xml"
    err = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", f"--junitxml={junit}",
                "-p", "no:cacheprovider"], a.budget * TESTS_SHARE + 60, out / "gpu-tests.log")  # fmt: skip
    card["tests"] = {"results": junit_results(junit)}
    if err and not card["tests"]["results"]:
        card["tests"]["error"] = err
    for name, script, share in BENCHMARKS:
        if not (BENCH / script).is_file():
            card["benchmarks"][name] = {
                "absent": True,
                "error": f"{script} is not in this checkout",
            }
            continue
        left = a.budget - (time.time() - t0)
        res = out / f"{name}.json"
        err = _run([sys.executable, str(BENCH / script), "--quick", "--json", str(res)],
                   min(a.budget * share, left), out / f"{name}.log")  # fmt: skip
        bench = json.loads(res.read_text()) if res.is_file() else {}
        bench.pop("environment", None)
        if err and not bench.get("results"):
            bench["error"] = err
        card["benchmarks"][name] = bench
    card["wall_s"] = time.time() - t0
    card["written"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    card["verdict"] = verdict(card)
    _write_atomic(out / "card.json", json.dumps(card, indent=2))
    _write_atomic(out / "card.md", render_markdown(card))
    print(render_markdown(card))
    print(f"written: {out / 'card.json'}, {out / 'card.md'}")
    return 0 if card["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
