"""What the GPU benchmarks share: optional-package detection, the environment record, and one
training run under ``torchrun --nproc_per_node 1`` reduced to the medians of its steady steps."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # sfmed from this checkout, installed or not


def available() -> dict[str, tuple[bool, str]]:
    """Whether each optional package imports (the same detection the trainer's plan uses)."""
    from sfmed.models.specs import flash_attn_status, te_available

    te = te_available()
    return {
        "flash_attn": flash_attn_status(),
        "transformer_engine": (
            te,
            "imports" if te else "transformer_engine.pytorch does not import",
        ),
    }


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (
        out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    )


def environment() -> dict:
    """Device, driver and versions, recorded with the numbers."""
    import megatron.core
    import torch

    have = available()
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else None,
        "driver": _driver(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "transformer_engine": _version("transformer_engine")
        if have["transformer_engine"][0]
        else None,
        "flash_attn": _version("flash_attn") if have["flash_attn"][0] else None,
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "peft": _version("peft"),
    }


def torchrun(entry: str, port: int) -> list[str]:
    """The start of a one-GPU torchrun command line for ``launch/<entry>``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
        f"--master_port={port}", str(REPO / "launch" / entry),
    ]  # fmt: skip


def run_training(
    args: list[str], run: Path, warmup: int, keys: tuple[str, ...], timeout: int
) -> dict:
    """Run ``args`` (a torchrun command whose ``ckpt_dir`` is ``run``); the medians of ``keys``
    over the logged steps after ``warmup``, peak memory, final loss, wall time — or the error."""
    t0 = time.time()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    out: dict = {"wall_s": round(time.time() - t0, 1)}
    metrics = run / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.is_file():
        err = proc.stderr
        out["error"] = "OOM" if "out of memory" in err.lower() else err.strip()[-400:]
        return out
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    if not recs:
        return {**out, "error": "the run logged no training step"}
    steady = [r for r in recs if r["step"] > warmup] or recs
    for key in keys:
        vals = [r[key] for r in steady if r.get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    out["mem_gb"] = max(r.get("mem_alloc_gb", 0) for r in recs)
    out["final_loss"] = recs[-1]["loss"]
    return out
