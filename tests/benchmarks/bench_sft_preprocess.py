"""Benchmark: SFT preprocessing (``format=sft``) vs pretraining preprocessing of the same text.

Target: SFT preprocessing of real conversations within 1.5x the time pretraining preprocessing
takes for the same text. The conversations come from ``../shared/data`` (DISC-Med multi-turn
dialogues, MedicalGPT ShareGPT SFT, huatuo26M test, Huatuo instructions, Chinese medical dialogue
CSV), repeated with a shuffle until there are ``--convs`` of them. The SFT input holds them as
``{"messages": [...]}``; the pretraining input holds, for each, the text of its turns joined by
newlines (``{"text": ...}``), so both tokenize the same characters. Both run in fresh child
processes pinned to the same cores, timed inside from "start" to "outputs written" (interpreter
start and imports excluded), interleaved over rounds; ratios are medians of per-round ratios,
of wall time and of CPU time (user + sys of all threads; on a shared machine the wall clock also
measures the neighbours).
Pretraining runs in its fastest mode (``clean=false dedup=none``, pure tokenization + writing)
and its default mode (cleaning + exact dedup); SFT runs with its defaults (seq 4096, packing).

    python tests/benchmarks/bench_sft_preprocess.py               # 3 rounds, 2 cores
    python tests/benchmarks/bench_sft_preprocess.py --convs 60000 --rounds 5
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SFMED_SHARED", REPO.parent / "shared"))

CHILD = r"""
import json, resource, sys, time
def _cpu():
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
from sfmed.config.data import PreprocessConfig
from sfmed.data.preprocess import preprocess
tok, inp, out, fmt, clean, dedup = sys.argv[1:7]
kw = dict(render="dialogue") if fmt == "sft" else dict(clean=clean == "true", dedup=dedup)
cfg = PreprocessConfig(tokenizer=tok, output_dir=out, input=inp, reader="jsonl", name="bench",
                       format=fmt, **kw)
c0, t0 = _cpu(), time.perf_counter()
report = preprocess(cfg)
print("SECONDS", time.perf_counter() - t0)
print("CPU", _cpu() - c0)
print("REPORT", json.dumps(report["total"]))
"""


def conversations(data: Path) -> list[list[dict]]:
    """Real conversations as message lists (system-less)."""
    out: list[list[dict]] = []

    def qa(q: str, a: str) -> list[dict]:
        return [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": a.strip()}]

    for line in (data / "DISC-MedLLM/train/test_examples.jsonl").open(encoding="utf-8"):
        out.append(json.loads(line)["conversation"])
    for line in (data / "MedicalGPT/sft/medical_sft_1K_format.jsonl").open(encoding="utf-8"):
        msgs = json.loads(line)["conversations"]
        out.append(
            [
                {"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]}
                for m in msgs
            ]
        )
    for r in json.loads((data / "huatuo26M_test/huatuo26M_test.json").read_text("utf-8")):
        out.append(qa(r["instruction"][0], r["output"][0]))
    for line in (data / "Huatuo-Llama-Med-Chinese/data_llama_data.json").open(encoding="utf-8"):
        r = json.loads(line)
        out.append(qa(f"{r['instruction']}\n{r['input']}", r["output"]))
    path = data / "Chinese-medical-dialogue-data/sample_IM_5000-6000.utf8.csv"
    with path.open(encoding="utf-8") as f:
        for r in csv.DictReader(f):
            out.append(qa(f"{r['title']}\n{r['ask']}", r["answer"]))
    return [c for c in out if all(m["content"].strip() for m in c)]


def build_inputs(work: Path, n: int, seed: int = 0) -> tuple[Path, Path, int]:
    """The SFT and pretraining inputs (same conversations, same characters)."""
    convs = conversations(SHARED / "data")
    rng = random.Random(seed)
    rows = [convs[i % len(convs)] for i in range(n)]
    rng.shuffle(rows)
    sft, pre = work / "sft.jsonl", work / "pretrain.jsonl"
    chars = 0
    with sft.open("w", encoding="utf-8") as fs, pre.open("w", encoding="utf-8") as fp:
        for msgs in rows:
            fs.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
            text = "\n".join(m["content"] for m in msgs)
            chars += len(text)
            fp.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return sft, pre, chars


def run_child(args: list[str], cores: list[int] | None) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds, report totals) of one child run."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="true")
    pre = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=pre,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    lines = proc.stdout.splitlines()
    secs = next(float(x.split()[1]) for x in lines if x.startswith("SECONDS"))
    cpu = next(float(x.split()[1]) for x in lines if x.startswith("CPU"))
    report = json.loads(next(x[7:] for x in lines if x.startswith("REPORT ")))
    return secs, cpu, report


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--convs", type=int, default=30_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--cores", type=int, default=2, help="pin every run to this many cores (0: all)"
    )
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers/qwen2")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if not (args.tokenizer / "tokenizer.json").is_file() or not (SHARED / "data").is_dir():
        sys.exit(f"needs the Qwen2 tokenizer and data under {SHARED} (SFMED_SHARED=...)")
    avail = sorted(os.sched_getaffinity(0))
    cores = avail[: args.cores] if args.cores else None
    work = Path(tempfile.mkdtemp(prefix="bench_sft_", dir=args.workdir))
    sft_in, pre_in, chars = build_inputs(work, args.convs)
    print(
        f"input: {args.convs:,} conversations, {chars / 1e6:.1f}M characters, "
        f"cores: {cores or avail}"
    )
    runs = {
        "pretrain_fast": ["pretrain", "false", "none"],
        "pretrain_default": ["pretrain", "true", "exact"],
        "sft": ["sft", "-", "-"],
    }
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    reports: dict[str, dict] = {}
    for r in range(args.rounds):
        for n in names[r % 3 :] + names[: r % 3]:
            out = work / f"{n}_{r}"
            inp = sft_in if n == "sft" else pre_in
            secs, cpu, rep = run_child([str(args.tokenizer), str(inp), str(out), *runs[n]], cores)
            times[n].append(secs)
            cpus[n].append(cpu)
            reports[n] = rep
        print(
            f"round {r + 1}: "
            + ", ".join(f"{n} {times[n][-1]:.2f}s (cpu {cpus[n][-1]:.2f}s)" for n in names),
            flush=True,
        )

    def ratio(base: str, m: dict[str, list[float]]) -> float:
        return statistics.median(a / b for a, b in zip(m["sft"], m[base], strict=True))

    sft = reports["sft"]
    result = {
        "conversations": args.convs,
        "cores": len(cores or avail),
        "seconds_median": {n: round(statistics.median(v), 3) for n, v in times.items()},
        "tokens": {"sft": sft["tokens"], "pretrain": reports["pretrain_fast"]["tokens"]},
        "sft_supervised_tokens": sft["supervised_tokens"],
        "sft_packing_efficiency": round(sft["packing"]["efficiency"], 4),
        "cpu_median": {n: round(statistics.median(v), 3) for n, v in cpus.items()},
        "wall_ratio_vs_pretrain_fast": round(ratio("pretrain_fast", times), 3),
        "wall_ratio_vs_pretrain_default": round(ratio("pretrain_default", times), 3),
        "cpu_ratio_vs_pretrain_fast": round(ratio("pretrain_fast", cpus), 3),
        "cpu_ratio_vs_pretrain_default": round(ratio("pretrain_default", cpus), 3),
    }
    print()
    print(f"{'run':<18}{'wall median s':>14}{'CPU median s':>14}")
    for n in names:
        print(f"{n:<18}{statistics.median(times[n]):>14.2f}{statistics.median(cpus[n]):>14.2f}")
    for what in ("wall", "cpu"):
        print(
            f"SFT / pretraining, same text, {what}: "
            f"{result[f'{what}_ratio_vs_pretrain_fast']:.2f}x vs clean=false dedup=none, "
            f"{result[f'{what}_ratio_vs_pretrain_default']:.2f}x vs the default (target <= 1.5x)"
        )
    print(f"SFT packing efficiency at seq 4096: {100 * result['sft_packing_efficiency']:.2f}%")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
