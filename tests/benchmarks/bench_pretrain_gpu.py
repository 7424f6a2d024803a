"""GPU benchmark of continued pretraining: tokens/s and MFU per configuration on one GPU.

Shapes (bf16, sequence 4096, random tokens through the real data pipeline):

* ``1.5b``: Qwen2-1.5B (28 layers, hidden 1536, GQA 12/2, vocab 151936).
* ``7b-layers``: 4 layers of Qwen2-7B width (hidden 3584, ffn 18944, GQA 28/4, vocab 152064), so
  it fits one GPU with its optimizer state.

Configurations vary the attention backend (megatron's unfused DotProductAttention = the
baseline; PyTorch SDPA; flash-attn and Transformer Engine when installed), activation
recomputation and the micro-batch. Each runs ``launch/pretrain.py`` under ``torchrun
--nproc_per_node 1`` in its own process; the numbers are medians over the steps after warm-up of
what the trainer logs to ``metrics.jsonl``, printed side by side with the ratio to the baseline.
MFU uses 989 TFLOP/s (H100/H200 bf16 dense); ``mfu`` counts full attention FLOPs (PaLM /
Megatron-LM convention), ``mfu_causal`` half of them. Targets: >= 50 % MFU (full) on 1.5b and
>= 55 % on 7b-layers without TE; the script prints each target with the measured value and
exits 1 when one is missed, 2 when a run failed.

    python tests/benchmarks/bench_pretrain_gpu.py --quick          # both shapes, best config (<= 6 min)
    python tests/benchmarks/bench_pretrain_gpu.py                  # everything (~15 min on H100)
    python tests/benchmarks/bench_pretrain_gpu.py --shapes 1.5b --configs sdpa-mbs2,unfused-mbs1
    python tests/benchmarks/bench_pretrain_gpu.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gpu_common import available, environment, run_training, torchrun

from sfmed.core.ports import free_port

SHAPES = {
    "1.5b": ["model=qwen2_1_5b"],
    "7b-layers": ["model=qwen2_7b", "model.num_layers=4"],
}
# name -> overrides; the first is the baseline the others are compared with.
CONFIGS = {
    "unfused-mbs1": ["model.transformer_impl=local", "model.attention_backend=unfused",
                     "train.micro_batch_size=1"],
    "sdpa-mbs1": ["model.transformer_impl=local", "model.attention_backend=sdpa",
                  "train.micro_batch_size=1"],
    "sdpa-mbs2": ["model.transformer_impl=local", "model.attention_backend=sdpa",
                  "train.micro_batch_size=2"],
    "sdpa-mbs4": ["model.transformer_impl=local", "model.attention_backend=sdpa",
                  "train.micro_batch_size=4"],
    "sdpa-mbs4-selective": ["model.transformer_impl=local", "model.attention_backend=sdpa",
                            "train.micro_batch_size=4", "parallel.recompute_granularity=selective",
                            "parallel.recompute_modules=[mlp]"],
    "sdpa-mbs8-full": ["model.transformer_impl=local", "model.attention_backend=sdpa",
                       "train.micro_batch_size=8", "parallel.recompute_granularity=full",
                       "parallel.recompute_method=uniform", "parallel.recompute_num_layers=1"],
    "flash-mbs2": ["model.transformer_impl=local", "model.attention_backend=flash",
                   "train.micro_batch_size=2"],
    "te-mbs2": ["model.transformer_impl=transformer_engine", "train.micro_batch_size=2"],
}  # fmt: skip
NEEDS = {"flash-mbs2": "flash_attn", "te-mbs2": "transformer_engine"}
# MFU (full attention FLOPs) the configurations without Transformer Engine should reach.
TARGETS = {"1.5b": 0.50, "7b-layers": 0.55}
QUICK_STEPS, QUICK_WARMUP = 8, 3
SEQ = 4096
TOKENS_PER_STEP = 64 * 1024  # global batch = 16 sequences of 4096


def make_corpus(path: Path, sequences: int, vocab: int) -> str:
    """Random-token indexed dataset (megatron's builder): one document per sequence."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(path / "random_text_document")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    for _ in range(sequences):
        b.add_document(torch.from_numpy(rng.integers(0, vocab, SEQ + 1)), [SEQ + 1])
    b.finalize(prefix + ".idx")
    return prefix


def run_config(
    shape: str, name: str, corpus: str, steps: int, warmup: int, work: Path, timeout: int = 1800
) -> dict:
    """One training run; the median of its steady-state metrics (or the failure)."""
    run = work / f"{shape}-{name}"
    mbs = int(name.split("mbs")[1].split("-")[0])
    gbs = TOKENS_PER_STEP // SEQ
    args = [
        *torchrun("pretrain.py", free_port()), "device=cuda",
        "train.precision=bf16", *SHAPES[shape], *CONFIGS[name], f"data.prefix={corpus}",
        f"data.seq_length={SEQ}", "data.num_workers=2", "data.split=100/0/0",
        f"train.steps={steps}", f"train.global_batch_size={max(gbs, mbs)}",
        "train.save_interval=0", "train.save_final=false", "optim.warmup_steps=1",
        "optim.spike_action=null", "logging.level=WARNING", f"ckpt_dir={run}",
    ]  # fmt: skip
    keys = ("tokens_per_s", "tflops_per_gpu", "mfu", "mfu_causal", "step_time_s")
    return {"shape": shape, "config": name, **run_training(args, run, warmup, keys, timeout)}


def quick_configs(have: dict[str, tuple[bool, str]]) -> list[str]:
    """The ``--quick`` subset: the fastest non-TE attention, plus TE when it imports."""
    configs = ["flash-mbs2" if have["flash_attn"][0] else "sdpa-mbs2"]
    if have["transformer_engine"][0]:
        configs.append("te-mbs2")
    return configs


def check_targets(rows: list[dict]) -> int:
    """Print each MFU target next to the best measured non-TE value; 0 ok, 1 missed, 2 failed."""
    status = 0
    print()
    print(f"{'shape':<10} {'target MFU':>10} {'measured':>9} {'config':<22} verdict")
    for shape, target in TARGETS.items():
        runs = [r for r in rows if r["shape"] == shape and not r["config"].startswith("te-")]
        ok = [r for r in runs if "error" not in r and r.get("mfu") is not None]
        if not runs:
            continue
        if not ok:
            why = "; ".join(r.get("error", "no MFU (unknown GPU peak)")[:80] for r in runs)
            print(f"{shape:<10} {target:>10.0%} {'-':>9} {'-':<22} FAILED: {why}")
            status = max(status, 2)
            continue
        best = max(ok, key=lambda r: r["mfu"])
        verdict = "met" if best["mfu"] >= target else "MISSED"
        print(f"{shape:<10} {target:>10.0%} {best['mfu']:>9.1%} {best['config']:<22} {verdict}")
        if best["mfu"] < target:
            status = max(status, 1)
    failed = [r for r in rows if "error" in r and "not installed" not in r["error"]]
    for r in failed:
        print(f"run failed: {r['shape']} {r['config']}: {r['error'][-200:]}")
    return 2 if failed else status


def print_table(rows: list[dict]) -> None:
    """Side by side, with the ratio to each shape's baseline (the first config)."""
    base = {}
    hdr = f"{'shape':<10} {'config':<22} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'MFUc':>6} {'mem GB':>7} {'vs base':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<10} {r['config']:<22} {'failed: ' + r['error'][:60]}")
            continue
        b = base.setdefault(r["shape"], r["tokens_per_s"])
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mfuc = f"{100 * r['mfu_causal']:.1f}%" if r["mfu_causal"] is not None else "-"
        print(
            f"{r['shape']:<10} {r['config']:<22} {r['tokens_per_s']:>9,.0f} "
            f"{r['tflops_per_gpu']:>8.1f} {mfu:>6} {mfuc:>6} {r['mem_gb']:>7.1f} "
            f"{r['tokens_per_s'] / b:>7.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"both shapes, the best config(s), {QUICK_STEPS} steps (<= 6 min)",
    )
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--configs", default=None, help=f"default: all of {list(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=None, help="default 20 (--quick: 8)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="steps left out of the medians (default 5, --quick: 3)",
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--workdir", help="keep runs here (default: a temporary folder)")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_pretrain_gpu.py needs a CUDA GPU")
    t_start = time.time()
    env = environment()
    print(json.dumps(env))
    have = available()
    if a.configs is None:
        a.configs = ",".join(quick_configs(have) if a.quick else CONFIGS)
    if a.steps is None:
        a.steps = QUICK_STEPS if a.quick else 20
    if a.warmup is None:
        a.warmup = QUICK_WARMUP if a.quick else 5
    if a.warmup >= a.steps:
        sys.exit(f"--warmup={a.warmup} must be smaller than --steps={a.steps}")
    configs = [c for c in a.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS] + [
        s for s in a.shapes.split(",") if s not in SHAPES
    ]
    if unknown:
        sys.exit(f"unknown shape/config {unknown}; shapes {list(SHAPES)}, configs {list(CONFIGS)}")
    rows = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        work = Path(tmp)
        gbs = TOKENS_PER_STEP // SEQ
        corpus = make_corpus(work, sequences=(a.steps + 1) * max(gbs, 8) + 8, vocab=151000)
        for shape in a.shapes.split(","):
            for name in configs:
                need = NEEDS.get(name)
                if need and not have[need][0]:
                    rows.append(
                        {
                            "shape": shape,
                            "config": name,
                            "error": f"{need} not installed: {have[need][1]}",
                        }
                    )
                    continue
                r = run_config(
                    shape, name, corpus, a.steps, a.warmup, work, 240 if a.quick else 1800
                )
                rows.append(r)
                print(json.dumps(r), flush=True)
    print()
    print_table(rows)
    status = check_targets(rows)
    print(f"\ntotal wall time {time.time() - t_start:.0f} s")
    if a.json:
        Path(a.json).write_text(
            json.dumps({"environment": env, "results": rows, "status": status}, indent=2)
        )
    sys.stdout.flush()
    sys.exit(status)


if __name__ == "__main__":
    main()
