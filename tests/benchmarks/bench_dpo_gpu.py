"""GPU benchmark of sharded DPO (``launch/dpo.py``) against SFT on the same tokens, one GPU.

Data: made-up preference pairs (a multi-turn prompt, a chosen and a rejected answer; the text
of ``bench_sft_gpu.synthetic_conversations``) encoded with a small locally built tokenizer at
sequence 4096 and packed (whole pairs per pack). The SFT baseline trains on the same
conversations — each pair's two sides as two conversations — so both recipes push the same
tokens through the same model. Shapes (bf16, random init): ``7b-layers`` (4 layers of Qwen2-7B
width, the issue's shape) and ``1.5b``.

Runs, each ``torchrun --nproc_per_node 1`` in its own process, medians over the steps after
warm-up of ``metrics.jsonl``:

* ``sft``: ``launch/sft.py`` (it also writes the checkpoint the DPO runs start from);
* ``dpo-precompute``: ``launch/dpo.py reference.mode=precompute`` — the reference log-probs are
  computed in one forward pass before step 1 (its time is in ``wall_s``, not in the steps);
* ``dpo-on-the-fly``: ``reference.mode=on_the_fly`` — a second frozen model scores every step.

Targets: DPO tokens/s ≥ 0.9× SFT's with the precomputed reference, ≥ 0.7× on the fly. Exits 1
when a target is missed, 2 when a run failed.

    python tests/benchmarks/bench_dpo_gpu.py --quick      # 7b-layers, 8 steps (<= 4 min)
    python tests/benchmarks/bench_dpo_gpu.py              # both shapes, 20 steps
    python tests/benchmarks/bench_dpo_gpu.py --dry-run    # data + commands only (CPU)
    python tests/benchmarks/bench_dpo_gpu.py --smoke      # the same runs, tiny model on CPU
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_sft_gpu import _CHARS, SHAPES, packing
from gpu_common import available, environment, run_training, torchrun

from sfmed.core.ports import free_port

SEQ = 4096
TOKENS_PER_STEP = 64 * 1024
TARGETS = {"dpo-precompute": 0.9, "dpo-on-the-fly": 0.7}
QUICK_STEPS, QUICK_WARMUP, QUICK_PAIRS = 8, 3, 4000
KEYS = ("tokens_per_s", "tflops_per_gpu", "mfu", "packing_efficiency", "step_time_s")


def synthetic_pairs(work: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` made-up pairs (TRL shape: prompt messages, chosen, rejected) and the same text as
    SFT conversations (each side once)."""
    rng = random.Random(seed)

    def text(mu: float) -> str:
        return "".join(rng.choices(_CHARS, k=min(int(rng.lognormvariate(mu, 0.8)) + 4, 1200)))

    pairs, convs = work / "pairs.jsonl", work / "sides.jsonl"
    with pairs.open("w", encoding="utf-8") as fp, convs.open("w", encoding="utf-8") as fc:
        for _ in range(n):
            prompt = []
            for _turn in range(rng.choice((0, 0, 1, 2))):
                prompt += [{"role": "user", "content": text(3.5)},
                           {"role": "assistant", "content": text(4.5)}]  # fmt: skip
            prompt.append({"role": "user", "content": text(3.5)})
            chosen, rejected = text(4.8), text(4.6)
            fp.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected},
                                ensure_ascii=False) + "\n")  # fmt: skip
            for answer in (chosen, rejected):
                msgs = [*prompt, {"role": "assistant", "content": answer}]
                fc.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return pairs, convs


def build_data(work: Path, pairs: int, seq: int = SEQ) -> tuple[Path, Path]:
    """(SFT prefix, preference prefix), both packed at SEQ with one locally built tokenizer."""
    from sfmed.config.data import PreprocessConfig
    from sfmed.data.preprocess import preprocess
    from sfmed.utils.tiny import make_tiny_tokenizer

    tok = make_tiny_tokenizer(work / "tokenizer", corpus=_CHARS * 20)
    pairs_jsonl, sides_jsonl = synthetic_pairs(work, pairs)
    for src, fmt, render in ((sides_jsonl, "sft", "dialogue"), (pairs_jsonl, "preference", None)):
        extra = {"render": render} if render else {}
        preprocess(PreprocessConfig(
            tokenizer=str(tok), output_dir=str(work / fmt), input=str(src), reader="jsonl",
            name="bench", format=fmt, chat={"seq_length": seq}, **extra,
        ))  # fmt: skip
    return work / "sft" / "bench_sft", work / "preference" / "bench_preference"


def attention() -> list[str]:
    """The fastest packed attention without Transformer Engine on this machine."""
    backend = "flash" if available()["flash_attn"][0] else "sdpa"
    return ["model.transformer_impl=local", f"model.attention_backend={backend}"]


SMOKE = ["device=cpu", "model=tiny"]  # --smoke: the same runs on CPU, fp32, sequence 256


def command(
    run: str, shape: str, prefix: Path, steps: int, out: Path, init: Path | None, seq: int = SEQ
) -> list[str]:
    """The torchrun command line of one run."""
    where = SMOKE if shape == "smoke" else ["device=cuda", "train.precision=bf16", *SHAPES[shape],
                                            *attention()]  # fmt: skip
    common = [
        *where, f"data.prefix={prefix}", f"data.seq_length={seq}", "data.num_workers=2",
        f"train.steps={steps}", f"train.global_batch_size={TOKENS_PER_STEP // SEQ}",
        "train.micro_batch_size=1", "train.save_interval=0", "optim.warmup_steps=1",
        "optim.spike_action=null", "logging.level=WARNING", f"ckpt_dir={out}",
    ]  # fmt: skip
    if run == "sft":  # its final checkpoint is the DPO runs' policy and reference
        return [*torchrun("sft.py", free_port()), *common, "train.save_final=true"]
    mode = run.removeprefix("dpo-").replace("-", "_")
    return [
        *torchrun("dpo.py", free_port()), *common, "train.save_final=false",
        f"init_from={init}", f"reference.mode={mode}",
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="7b-layers only, 8 steps")
    ap.add_argument("--shapes", default=None, help=f"default: all of {list(SHAPES)}")
    ap.add_argument("--steps", type=int, default=None, help="default 20 (--quick: 8)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the medians")
    ap.add_argument("--pairs", type=int, default=None, help="preference pairs to make")
    ap.add_argument("--dry-run", action="store_true", help="build the data, print the commands")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the runs work")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--workdir", help="keep data and runs here (default: a temporary folder)")
    a = ap.parse_args()
    shapes = (a.shapes or ("7b-layers" if a.quick else ",".join(SHAPES))).split(",")
    steps = a.steps or (QUICK_STEPS if a.quick else 20)
    warmup = a.warmup if a.warmup is not None else (QUICK_WARMUP if a.quick else 5)
    n_pairs = a.pairs or (QUICK_PAIRS if a.quick else 12000)
    seq = SEQ
    if a.smoke:
        shapes, steps, warmup, n_pairs, seq = ["smoke"], 4, 1, min(n_pairs, 300), 256
    if unknown := [s for s in shapes if s not in SHAPES and s != "smoke"]:
        sys.exit(f"unknown shape {unknown}; shapes {list(SHAPES)}")
    if warmup >= steps:
        sys.exit(f"--warmup={warmup} must be smaller than --steps={steps}")
    import torch

    if not (a.dry_run or a.smoke) and not torch.cuda.is_available():
        sys.exit("bench_dpo_gpu.py needs a CUDA GPU (--dry-run checks the data and commands)")
    rows, status = [], 0
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        work = Path(tmp)
        sft_prefix, pref_prefix = build_data(work, n_pairs, seq)
        pk = {"sft": packing(sft_prefix)}
        print(json.dumps({"data": str(work), **pk}), flush=True)
        for shape in shapes:
            base = None
            for run in ("sft", "dpo-precompute", "dpo-on-the-fly"):
                out = work / f"{shape}-{run}"
                prefix = sft_prefix if run == "sft" else pref_prefix
                init = work / f"{shape}-sft"
                cmd = command(run, shape, prefix, steps, out, init, seq)
                if a.dry_run:
                    print(" ".join(map(str, cmd)))
                    continue
                r = {"shape": shape, "config": run,
                     **run_training(cmd, out, warmup, KEYS, 600 if a.quick else 1800)}  # fmt: skip
                if run == "sft":
                    base = r.get("tokens_per_s")
                elif base and r.get("tokens_per_s"):
                    r["vs_sft"] = r["tokens_per_s"] / base
                rows.append(r)
                print(json.dumps(r), flush=True)
                if run == "sft" and "error" in r:
                    break  # no checkpoint for the DPO runs
    if a.dry_run:
        return
    print(f"\n{'shape':<10} {'run':<16} {'tok/s':>9} {'MFU':>6} {'mem GB':>7} {'vs SFT':>7} target")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<10} {r['config']:<16} failed: {r['error'][:80]}")
            status = 2
            continue
        target = TARGETS.get(r["config"])
        ratio = r.get("vs_sft")
        verdict = "" if target is None else f">= {target} {'met' if ratio >= target else 'MISSED'}"
        if target is not None and ratio < target:
            status = max(status, 1)
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"{r['shape']:<10} {r['config']:<16} {r['tokens_per_s']:>9,.0f} {mfu:>6} "
              f"{r['mem_gb']:>7.1f} {ratio or 1.0:>7.2f} {verdict}")  # fmt: skip
    if a.json:
        out = {"environment": environment(), "packing": pk["sft"], "results": rows,
               "status": status}  # fmt: skip
        Path(a.json).write_text(json.dumps(out, indent=2))
    sys.exit(status)


if __name__ == "__main__":
    main()
