"""Helpers of the DPO training tests: a learnable toy preference set and the runs' plumbing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, _free_port

SYMPTOMS = ["头痛", "发热", "咳嗽", "胸闷", "腹泻", "失眠", "皮疹", "腰痛", "头晕", "乏力"]
DAYS = ["两天", "一周", "三周", "一个月", "半年"]
GOOD = ["去看医生。", "请去医院。", "要看医生。"]
BAD = ["不用管。", "忍一忍。", "别去医院。"]


def toy_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` TRL-style pairs whose chosen answer always recommends seeing a doctor (a rule a
    tiny model can learn), in a fixed pseudo-random order."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        s, d = SYMPTOMS[rng.integers(len(SYMPTOMS))], DAYS[rng.integers(len(DAYS))]
        rows.append(
            {
                "prompt": f"{s}{d}怎么办",
                "chosen": GOOD[rng.integers(len(GOOD))],
                "rejected": BAD[rng.integers(len(BAD))],
            }
        )
    return rows


def env() -> dict:
    e = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")])
    return e


def run(args: list[str], what: str, nproc: int | None = None, check: bool = True, timeout=900):
    """``python <args>`` (or under torchrun with ``nproc`` processes) from the repository root."""
    if nproc is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]  # fmt: skip
    else:
        cmd = [sys.executable, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"{what} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def preprocess_pairs(rows: list[dict], tokenizer: Path, out: Path, seq: int, pack: bool) -> Path:
    """``rows`` through ``launch/preprocess.py format=preference``; returns the prefix."""
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "toy.jsonl"
    raw.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    run([str(REPO / "launch/preprocess.py"), "format=preference", f"input={raw}", "name=toy",
         "reader=jsonl", f"tokenizer={tokenizer}", f"output_dir={out}",
         f"chat.seq_length={seq}", f"chat.pack={str(pack).lower()}", "chat.system_prompt=''"],
        "preprocess")  # fmt: skip
    return out / "toy_preference"


def convert_tiny(tmp: Path, tokenizer: Path) -> Path:
    """A tiny random Qwen2 (with the tokenizer) converted to a Megatron checkpoint."""
    from transformers import AutoTokenizer

    from sfmed.utils.tiny import make_tiny_qwen2

    hf = make_tiny_qwen2(tmp / "hf")
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(hf)
    run([str(REPO / "launch/convert.py"), "to=mcore", f"src={hf}", f"dst={tmp / 'mcore'}",
         "progress=false"], "convert to=mcore")  # fmt: skip
    return tmp / "mcore"


def metrics(run_dir: Path) -> dict[int, dict]:
    """step -> record of a run's metrics.jsonl."""
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in rows if "loss" in r}


def write_preference_dataset(
    prefix: Path, samples, seq_length: int, vocab: int, packed: bool, kind: str = "preference"
):
    """Write ``samples`` (each a list of pairs; a pair is two (ids, target-mask) sides sharing a
    prompt) as ``launch/preprocess.py format=preference`` does (``kind``: the sidecar's)."""
    from sfmed.data.chat.store import ChatWriter

    w = ChatWriter(prefix, np.uint16)
    for pairs in samples:
        sides = [side for pair in pairs for side in pair]
        w.add_sample([np.asarray(i, np.uint16) for i, _ in sides],
                     [np.asarray(m, np.uint8) for _, m in sides])  # fmt: skip
    w.finish(
        {
            "kind": kind,
            "seq_length": seq_length,
            "mask": "last",
            "tokenizer": {"vocab_size": vocab, "eod_id": 0},
            "stats": {"packing": {"packed": packed}},
        }
    )
    return prefix


def random_pairs(n: int, rng, vocab: int, lo: int = 4, hi: int = 12):
    """``n`` pairs: a shared random prompt, two different random answers (the targets)."""
    out = []
    for _ in range(n):
        prompt = rng.integers(1, vocab, int(rng.integers(lo, hi + 1)))
        pair = []
        for _ in range(2):
            ans = rng.integers(1, vocab, int(rng.integers(2, hi + 1)))
            ids = np.concatenate([prompt, ans])
            mask = np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(ans), np.uint8)])
            pair.append((ids, mask))
        out.append(pair)
    return out
