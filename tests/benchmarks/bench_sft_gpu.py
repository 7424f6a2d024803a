"""GPU benchmark of sharded SFT (``launch/sft.py``): real-token throughput, MFU and packing.

Data: real Chinese medical conversations from ``../shared/data`` (DISC-Med, MedicalGPT,
huatuo26M, Huatuo instructions, Chinese medical dialogue; the loader of
``bench_sft_preprocess.py``), encoded with the real Qwen2 tokenizer by ``launch/preprocess.py
format=sft`` at sequence 4096, packed (best-fit decreasing). Or any SFT dataset: ``--data``.

Shapes (bf16, seq 4096, random init — throughput does not depend on the weights):

* ``1.5b``: Qwen2-1.5B; ``7b-layers``: 4 layers of Qwen2-7B width (fits one GPU with Adam).

Configurations: the packed attention kernel (``sdpa``: FlexAttention with a document mask;
``flash``: flash-attn's varlen kernel; ``te``: Transformer Engine's THD attention) and the
micro-batch (each micro-batch is one THD pack of ``mbs × 4096`` tokens). Each runs
``launch/sft.py`` under ``torchrun --nproc_per_node 1`` in its own process; numbers are medians
over the steps after warm-up of ``metrics.jsonl``: ``tokens_per_s`` counts real (non-pad)
tokens, ``loss_tokens_per_s`` supervised ones, ``mfu`` is the trainer's (real tokens × the
model's FLOPs per token at full-sequence attention, 989 TFLOP/s peak). Target (issue 12, no TE):
MFU ≥ 50 % counting real tokens, packing ≥ 95 %.

    python tests/benchmarks/bench_sft_gpu.py                       # everything
    python tests/benchmarks/bench_sft_gpu.py --quick               # best config per shape (<= 4 min)
    python tests/benchmarks/bench_sft_gpu.py --synthetic           # no corpora needed (see below)
    python tests/benchmarks/bench_sft_gpu.py --shapes 1.5b --configs sdpa-mbs1
    python tests/benchmarks/bench_sft_gpu.py --dry-run             # data + commands only (CPU)

``--synthetic`` (the default when the real conversations are not there) writes deterministic
multi-turn conversations of made-up Chinese text with a long-tailed length distribution and
encodes them with a small locally built tokenizer (ids fit any vocabulary): the throughput and
MFU of a given shape do not depend on which tokens are trained, only on how full the packs are,
so the card reports the packing of the data it ran with.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gpu_common import REPO, available, environment, run_training, torchrun

from sfmed.core.ports import free_port

SHARED = Path(os.environ.get("SFMED_SHARED", REPO.parent / "shared"))
SEQ = 4096
TOKENS_PER_STEP = 64 * 1024  # global batch = 16 packs of 4096

SHAPES = {
    "1.5b": ["model=qwen2_1_5b"],
    "7b-layers": ["model=qwen2_7b", "model.num_layers=4"],
}
CONFIGS = {
    "sdpa-mbs1": ["model.transformer_impl=local", "model.attention_backend=sdpa",
                  "train.micro_batch_size=1"],
    "sdpa-mbs2": ["model.transformer_impl=local", "model.attention_backend=sdpa",
                  "train.micro_batch_size=2"],
    "flash-mbs1": ["model.transformer_impl=local", "model.attention_backend=flash",
                   "train.micro_batch_size=1"],
    "flash-mbs2": ["model.transformer_impl=local", "model.attention_backend=flash",
                   "train.micro_batch_size=2"],
    "te-mbs1": ["model.transformer_impl=transformer_engine", "train.micro_batch_size=1"],
}  # fmt: skip
NEEDS = {"flash-mbs1": "flash_attn", "flash-mbs2": "flash_attn", "te-mbs1": "transformer_engine"}


QUICK_STEPS, QUICK_WARMUP, QUICK_CONVS = 8, 3, 6000
_CHARS = "患者头痛发热咳嗽三天伴恶心呕吐腹泻查体血压心率正常建议口服药物休息复诊医生检查治疗"


def synthetic_conversations(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` made-up multi-turn consultations as ``{"messages": [...]}`` JSONL (deterministic)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            msgs = []
            for _turn in range(rng.choice((1, 1, 2, 3, 4))):
                for role, mu in (("user", 3.5), ("assistant", 4.8)):
                    k = min(int(rng.lognormvariate(mu, 0.8)) + 4, 1500)
                    msgs.append({"role": role, "content": "".join(rng.choices(_CHARS, k=k))})
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path


def build_data(work: Path, tokenizer: Path | None, convs: int, synthetic: bool) -> Path:
    """Conversations -> one packed SFT dataset at SEQ (returns its prefix): the real ones from
    the corpora (``bench_sft_preprocess``), or synthetic ones with a locally built tokenizer."""
    from sfmed.config.data import PreprocessConfig
    from sfmed.data.preprocess import preprocess

    if synthetic:
        from sfmed.utils.tiny import make_tiny_tokenizer

        sft_jsonl = synthetic_conversations(work / "synthetic.jsonl", convs)
        tokenizer = make_tiny_tokenizer(work / "tokenizer", corpus=_CHARS * 20)
    else:
        from bench_sft_preprocess import build_inputs

        sft_jsonl, _, _ = build_inputs(work, convs)
    cfg = PreprocessConfig(
        tokenizer=str(tokenizer), output_dir=str(work / "sft"), input=str(sft_jsonl),
        reader="jsonl", render="dialogue", name="bench", format="sft",
        chat={"seq_length": SEQ},
    )  # fmt: skip
    preprocess(cfg)
    return work / "sft" / "bench_sft"


def packing(prefix: Path) -> dict:
    """Packing efficiency of the dataset: real and supervised tokens / capacity."""
    from sfmed.data.chat.store import SFTDataset

    ds = SFTDataset(prefix)
    real = int(ds.sample_lengths.sum())
    sup = sum(float(ds[i]["loss_mask"].sum()) for i in range(len(ds)))
    cap = len(ds) * SEQ
    return {"samples": len(ds), "packing": real / cap, "supervised": sup / cap}


def command(shape: str, name: str, prefix: Path, steps: int, run: Path) -> list[str]:
    """The torchrun command line of one configuration."""
    mbs = int(name.split("mbs")[1].split("-")[0])
    gbs = max(TOKENS_PER_STEP // SEQ, mbs)
    return [
        *torchrun("sft.py", free_port()), "device=cuda",
        "train.precision=bf16", *SHAPES[shape], *CONFIGS[name], f"data.prefix={prefix}",
        f"data.seq_length={SEQ}", "data.num_workers=2", f"train.steps={steps}",
        f"train.global_batch_size={gbs}", "train.save_interval=0", "train.save_final=false",
        "optim.warmup_steps=1", "optim.spike_action=null", "logging.level=WARNING",
        f"ckpt_dir={run}",
    ]  # fmt: skip


def run_config(
    shape: str, name: str, prefix: Path, steps: int, warmup: int, work: Path, timeout: int = 1800
) -> dict:
    """One training run; the medians of its steady-state metrics (or the failure)."""
    run = work / f"{shape}-{name}"
    keys = ("tokens_per_s", "loss_tokens_per_s", "tflops_per_gpu", "mfu", "packing_efficiency",
            "step_time_s")  # fmt: skip
    result = run_training(command(shape, name, prefix, steps, run), run, warmup, keys, timeout)
    return {"shape": shape, "config": name, **result}


def quick_configs() -> list[str]:
    """The ``--quick`` subset: the fastest packed attention without TE, plus TE when it imports."""
    have = available()
    configs = ["flash-mbs1" if have["flash_attn"][0] else "sdpa-mbs1"]
    if have["transformer_engine"][0]:
        configs.append("te-mbs1")
    return configs


def print_table(rows: list[dict]) -> None:
    """Side by side."""
    hdr = (f"{'shape':<10} {'config':<12} {'real tok/s':>11} {'sup tok/s':>10} {'TFLOP/s':>8} "
           f"{'MFU':>6} {'packing':>8} {'mem GB':>7}")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<10} {r['config']:<12} failed: {r['error'][:60]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(
            f"{r['shape']:<10} {r['config']:<12} {r['tokens_per_s']:>11,.0f} "
            f"{r['loss_tokens_per_s']:>10,.0f} {r['tflops_per_gpu']:>8.1f} {mfu:>6} "
            f"{100 * r['packing_efficiency']:>7.1f}% {r['mem_gb']:>7.1f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true",
        help=f"both shapes, the best config(s), {QUICK_STEPS} steps, {QUICK_CONVS} conversations",
    )  # fmt: skip
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--configs", default=None, help=f"default: all of {list(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=None, help="default 20 (--quick: 8)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the medians")
    ap.add_argument("--data", help="an SFT dataset prefix (default: built from ../shared/data)")
    ap.add_argument("--synthetic", action="store_true", help="made-up conversations (see above)")
    ap.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "qwen2"))
    ap.add_argument("--convs", type=int, default=None, help="conversations to encode")
    ap.add_argument("--dry-run", action="store_true", help="build the data, print the commands")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--workdir", help="keep data and runs here (default: a temporary folder)")
    a = ap.parse_args()
    configs = [c for c in (a.configs or "").split(",") if c]
    if not configs:
        configs = quick_configs() if a.quick else list(CONFIGS)
    steps = a.steps or (QUICK_STEPS if a.quick else 20)
    warmup = a.warmup if a.warmup is not None else (QUICK_WARMUP if a.quick else 5)
    convs = a.convs or (QUICK_CONVS if a.quick else 30000)
    shapes = [s for s in a.shapes.split(",") if s]
    unknown = [c for c in configs if c not in CONFIGS] + [s for s in shapes if s not in SHAPES]
    if unknown:
        sys.exit(f"unknown shape/config {unknown}; shapes {list(SHAPES)}, configs {list(CONFIGS)}")
    if warmup >= steps:
        sys.exit(f"--warmup={warmup} must be smaller than --steps={steps}")
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        sys.exit("bench_sft_gpu.py needs a CUDA GPU (--dry-run checks the data and commands)")
    real = (SHARED / "data").is_dir() and (Path(a.tokenizer) / "tokenizer.json").is_file()
    synthetic = a.synthetic or not real
    rows = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        work = Path(tmp)
        prefix = Path(a.data) if a.data else build_data(work, Path(a.tokenizer), convs, synthetic)
        pk = {"synthetic": synthetic and not a.data, **packing(prefix)}
        print(json.dumps({"data": str(prefix), **pk}), flush=True)
        for shape in shapes:
            for name in configs:
                if a.dry_run:
                    print(" ".join(command(shape, name, prefix, steps, work / "run")))
                    continue
                need = NEEDS.get(name)
                if need and importlib.util.find_spec(need) is None:
                    rows.append({"shape": shape, "config": name, "error": f"{need} not installed"})
                    continue
                r = run_config(shape, name, prefix, steps, warmup, work, 300 if a.quick else 1800)
                rows.append(r)
                print(json.dumps(r), flush=True)
        if not a.dry_run:
            print()
            print_table(rows)
            if a.json:
                out = {"environment": environment(), "packing": pk, "results": rows}
                Path(a.json).write_text(json.dumps(out, indent=2))
    failed = [r for r in rows if "error" in r and "not installed" not in r["error"]]
    sys.exit(2 if failed else 0)


if __name__ == "__main__":
    main()
