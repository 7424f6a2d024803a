"""Benchmark: sfmed preprocessing vs the raw gigatoken + ``IndexedDatasetBuilder`` pipeline.

Targets (issue 3, 2 cores, 60,000 real Chinese medical documents, ~10M Qwen2 tokens):
``clean=false dedup=none`` within 1.1x of the raw pipeline, the default (cleaning + exact dedup)
within 2x, and ids byte-identical to HF ``tokenizers`` in every mode.

The input JSONL is built at run time from ``../shared/data`` (huatuo26M test, Huatuo llama_data,
MedicalGPT SFT/pretrain/RAG text, Chinese-medical-dialogue CSV and text, DISC-Med samples): every
real document once, then pairs of different documents joined, until there are 60,000 (distinct
texts, so dedup has real work). Each run is a fresh child process pinned to the same cores; the
time is measured inside it from "start loading the tokenizer" to ".bin/.idx written" (interpreter
start and imports excluded for both). Runs are interleaved in rotating order; the ratios are
medians of per-round ratios (and of the best runs).

    python tests/benchmarks/bench_preprocess.py              # 5 rounds, 2 cores, HF id check
    python tests/benchmarks/bench_preprocess.py --rounds 9 --no-hf-check
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
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("SFMED_SHARED", REPO.parent / "shared"))

# CPU time (user + sys, all threads and worker processes) of the timed part, next to wall time:
# on a shared machine the wall clock also measures the neighbours, CPU time much less.
PRELUDE = r"""
import resource as _r
def _cpu():
    a, b = _r.getrusage(_r.RUSAGE_SELF), _r.getrusage(_r.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
"""
EPILOGUE = r"""
print("CPU", _cpu() - _c0)
"""

RAW = r"""
import sys, time, numpy as np
import gigatoken
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
tok_dir, inp, prefix = sys.argv[1:4]
_c0 = _cpu()
t0 = time.perf_counter()
tok = gigatoken.Tokenizer(tok_dir)
eod = int(tok.encode("<|endoftext|>")[0])
ids = tok.encode_files(gigatoken.JsonlFileSource([inp], field="text"))
offsets = np.asarray(ids.layout.offsets); flat = np.asarray(ids.layout.content.data)
dtype = DType.optimal_dtype(tok.vocab_size)
b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
for i in range(len(offsets) - 1):
    s, e = offsets[i], offsets[i + 1]
    b.add_document(np.append(flat[s:e], eod), [e - s + 1])
b.finalize(prefix + ".idx")
print("SECONDS", time.perf_counter() - t0)
"""

SFMED = r"""
import sys, time
from sfmed.config.data import PreprocessConfig
from sfmed.data.preprocess import preprocess
tok_dir, inp, out, clean, dedup = sys.argv[1:6]
cfg = PreprocessConfig(tokenizer=tok_dir, output_dir=out, input=inp, reader="jsonl", name="bench",
                       clean=clean == "true", dedup=dedup)
_c0 = _cpu()
t0 = time.perf_counter()
report = preprocess(cfg)
print("SECONDS", time.perf_counter() - t0)
print("REPORT", __import__("json").dumps(report["total"]))
"""


def _docs_from_shared(data: Path) -> list[str]:
    docs: list[str] = []
    for r in json.loads((data / "huatuo26M_test/huatuo26M_test.json").read_text(encoding="utf-8")):
        docs.append(f"问：{r['instruction'][0]}\n答：{r['output'][0]}")
    for line in (data / "Huatuo-Llama-Med-Chinese/data_llama_data.json").open(encoding="utf-8"):
        r = json.loads(line)
        docs.append(
            f"问：{r['instruction']}\n{r['input']}\n答：{r['output']}".replace("\n\n", "\n")
        )
    for line in (data / "MedicalGPT/sft/medical_sft_1K_format.jsonl").open(encoding="utf-8"):
        r = json.loads(line)
        docs.append(
            "\n".join(
                ("问：" if m["from"] == "human" else "答：") + m["value"]
                for m in r["conversations"]
            )
        )
    with (data / "Chinese-medical-dialogue-data/sample_IM_5000-6000.utf8.csv").open(
        encoding="utf-8"
    ) as f:
        for r in csv.DictReader(f):
            docs.append(f"问：{r['title']}\n{r['ask']}\n答：{r['answer']}")
    blocks = (data / "Chinese-medical-dialogue-data/IM_neike.utf8.txt").read_text(encoding="utf-8")
    docs += [b.strip() for b in blocks.split("\n\n\n") if b.strip()]
    for line in (data / "DISC-MedLLM/train/test_examples.jsonl").open(encoding="utf-8"):
        r = json.loads(line)
        docs.append("\n".join(m["content"] for m in r["conversation"]))
    for name in ("MedicalGPT/pretrain/fever.txt", "MedicalGPT/rag/medical_corpus.txt"):
        text = (data / name).read_text(encoding="utf-8")
        docs += [p.strip() for p in text.split("\n") if len(p.strip()) > 20]
    return docs


def build_input(path: Path, n_docs: int, seed: int = 0) -> int:
    """Write ``n_docs`` JSON lines {"text": ...} from the shared data; return the count."""
    docs = _docs_from_shared(SHARED / "data")
    rng = random.Random(seed)
    out = list(docs)
    while len(out) < n_docs:
        a, b = rng.sample(docs, 2)
        out.append(a + "\n" + b)
    rng.shuffle(out)
    with path.open("w", encoding="utf-8") as f:
        for t in out[:n_docs]:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return n_docs


def run_child(code: str, args: list[str], cores: list[int] | None) -> tuple[float, float, str]:
    """(wall seconds of the timed part, CPU seconds of the timed part, stdout) of one child."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="true")
    pre = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + code + EPILOGUE, *args],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=pre,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    secs = next(float(x.split()[1]) for x in proc.stdout.splitlines() if x.startswith("SECONDS"))
    cpu = next(float(x.split()[1]) for x in proc.stdout.splitlines() if x.startswith("CPU"))
    return secs, cpu, proc.stdout


def hf_check(tok_dir: Path, texts: list[str], prefix: str, eod: int) -> tuple[int, int]:
    """(documents compared, mismatches) of ``prefix`` against HF tokenizers + EOD."""
    import numpy as np
    from tokenizers import Tokenizer

    from sfmed.data.indexed import idx_path, read_index_header

    hdr = read_index_header(prefix)
    raw = np.fromfile(idx_path(prefix), dtype=np.uint8)
    n = hdr["sequences"]
    lengths = raw[34 : 34 + 4 * n].view(np.int32)
    ids = np.fromfile(prefix + ".bin", dtype=np.dtype(hdr["dtype"]))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    bad = 0
    if len(texts) != n:
        return n, abs(len(texts) - n) or 1
    for start in range(0, n, 5000):
        encs = tok.encode_batch(texts[start : start + 5000], add_special_tokens=False)
        for i, e in enumerate(encs, start):
            if ids[offsets[i] : offsets[i + 1]].tolist() != [*e.ids, eod]:
                bad += 1
    return n, bad


def expected_default_texts(inp: Path) -> list[str]:
    """What the default mode keeps: cleaned texts, first occurrence only."""
    from sfmed.config.data import CleanConfig
    from sfmed.data.clean import make_cleaner

    c = CleanConfig()
    clean = make_cleaner(c.unicode, c.strip_html, c.whitespace, c.min_chars, c.max_chars)
    seen, out = set(), []
    for line in inp.open(encoding="utf-8"):
        t, why = clean(json.loads(line)["text"])
        if why is None and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--docs", type=int, default=60_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--cores", type=int, default=2, help="pin every run to this many cores (0: all)"
    )
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers/qwen2")
    ap.add_argument("--no-hf-check", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if not (args.tokenizer / "tokenizer.json").is_file() or not (SHARED / "data").is_dir():
        sys.exit(f"needs the Qwen2 tokenizer and data under {SHARED} (SFMED_SHARED=...)")
    avail = sorted(os.sched_getaffinity(0))
    cores = avail[: args.cores] if args.cores else None
    work = Path(tempfile.mkdtemp(prefix="bench_pre_", dir=args.workdir))
    inp = work / "docs.jsonl"
    build_input(inp, args.docs)
    size_mb = inp.stat().st_size / 2**20
    print(f"input: {args.docs:,} documents, {size_mb:.1f} MiB JSONL, cores: {cores or avail}")

    names = ["raw", "sfmed_fast", "sfmed_default"]
    times: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    reports: dict[str, dict] = {}
    for r in range(args.rounds):
        order = names[r % 3 :] + names[: r % 3]
        for n in order:
            out = work / f"{n}_{r}"
            out.mkdir()
            if n == "raw":
                secs, cpu, _ = run_child(
                    RAW, [str(args.tokenizer), str(inp), str(out / "bench_text_document")], cores
                )
            else:
                clean, dedup = ("false", "none") if n == "sfmed_fast" else ("true", "exact")
                secs, cpu, stdout = run_child(
                    SFMED, [str(args.tokenizer), str(inp), str(out), clean, dedup], cores
                )
                reports[n] = json.loads(
                    next(x[7:] for x in stdout.splitlines() if x.startswith("REPORT "))
                )
            times[n].append(secs)
            cpus[n].append(cpu)
        print(
            f"round {r + 1}: "
            + ", ".join(f"{n} {times[n][-1]:.2f}s (cpu {cpus[n][-1]:.2f}s)" for n in names),
            flush=True,
        )

    def ratios(n: str) -> tuple[float, float]:
        paired = statistics.median(a / b for a, b in zip(times[n], times["raw"]))
        return paired, min(times[n]) / min(times["raw"])

    last = args.rounds - 1
    raw_prefix = str(work / f"raw_{last}/bench_text_document")
    fast_prefix = str(work / f"sfmed_fast_{last}/bench_text_document")
    same_bytes = all(
        Path(raw_prefix + ext).read_bytes() == Path(fast_prefix + ext).read_bytes()
        for ext in (".bin", ".idx")
    )
    result = {
        "docs": args.docs,
        "tokens": reports["sfmed_fast"]["tokens"],
        "cores": len(cores or avail),
        "seconds_median": {n: round(statistics.median(v), 3) for n, v in times.items()},
        "seconds_min": {n: round(min(v), 3) for n, v in times.items()},
        "ratio_fast_vs_raw": [round(x, 3) for x in ratios("sfmed_fast")],
        "ratio_default_vs_raw": [round(x, 3) for x in ratios("sfmed_default")],
        "cpu_seconds_median": {n: round(statistics.median(v), 3) for n, v in cpus.items()},
        "cpu_ratio_fast_vs_raw": round(
            statistics.median(cpus["sfmed_fast"]) / statistics.median(cpus["raw"]), 3
        ),
        "cpu_ratio_default_vs_raw": round(
            statistics.median(cpus["sfmed_default"]) / statistics.median(cpus["raw"]), 3
        ),
        "fast_bin_idx_identical_to_raw": same_bytes,
        "default_dropped": reports["sfmed_default"]["dropped"],
    }
    if not args.no_hf_check:
        texts = [json.loads(line)["text"] for line in inp.open(encoding="utf-8")]
        eod = 151643
        result["hf_check_fast"] = hf_check(args.tokenizer, texts, fast_prefix, eod)
        result["hf_check_default"] = hf_check(
            args.tokenizer,
            expected_default_texts(inp),
            str(work / f"sfmed_default_{last}/bench_text_document"),
            eod,
        )
    sm, sb, cm = result["seconds_median"], result["seconds_min"], result["cpu_seconds_median"]
    rows = [
        ("raw gigatoken + IndexedDatasetBuilder", "raw", "1 / 1", 1, ""),
        (
            "sfmed clean=false dedup=none",
            "sfmed_fast",
            "{} / {}".format(*result["ratio_fast_vs_raw"]),
            result["cpu_ratio_fast_vs_raw"],
            "<= 1.1",
        ),
        (
            "sfmed default (clean, exact dedup)",
            "sfmed_default",
            "{} / {}".format(*result["ratio_default_vs_raw"]),
            result["cpu_ratio_default_vs_raw"],
            "<= 2",
        ),
    ]
    print()
    print(
        "| pipeline | wall median s | wall best s | CPU median s | wall ratio (median / best) | CPU ratio | target |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, key, ratio, cpu_ratio, target in rows:
        print(f"| {label} | {sm[key]} | {sb[key]} | {cm[key]} | {ratio} | {cpu_ratio} | {target} |")
    print()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
