"""Shared pytest fixtures: markers, tiny Qwen2 models, a torchrun runner for CPU-emulated tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SFMED_SHARED", REPO.parent / "shared"))

# Tests never reach the network and never log to wandb's servers.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "dist: launches torchrun workers (CPU emulation, gloo)")
    config.addinivalue_line("markers", "slow: takes more than ~30 s on 2 cores")
    config.addinivalue_line("markers", "shared: reads ../shared (skipped when absent)")
    config.addinivalue_line(
        "markers",
        "mcore_compat: exercises megatron-core directly; CI runs these on every supported "
        "megatron-core release (.ci/compat312.sh)",
    )


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="no CUDA device visible")
    for item in items:
        # The marker, not item.keywords: keywords also hold file names (test_gpu_decisions.py).
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (real tokenizers and data); skips the test when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present (real data/tokenizers are optional)")
    return SHARED


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(shared_dir) -> Path:
    """The real Qwen2 tokenizer folder from ``../shared``; skips when absent."""
    p = shared_dir / "tokenizers" / "qwen2"
    if not (p / "tokenizer.json").is_file():
        pytest.skip(f"{p}/tokenizer.json not present")
    return p


@pytest.fixture(scope="session")
def tiny_qwen2_factory(tmp_path_factory):
    """Build (once per distinct kwargs) a tiny random HF Qwen2 folder; returns its path."""
    from sfmed.utils.tiny import make_tiny_qwen2

    cache: dict[str, Path] = {}

    def make(**kw) -> Path:
        key = json.dumps(kw, sort_keys=True, default=str)
        if key not in cache:
            d = tmp_path_factory.mktemp("tiny_qwen2")
            cache[key] = make_tiny_qwen2(d / "hf", **kw)
        return cache[key]

    return make


def _free_port() -> int:
    from sfmed.core.ports import free_port

    return free_port()


@pytest.fixture
def torchrun():
    """Run ``python -m torch.distributed.run --nproc_per_node N script args`` on CPU.

    Returns the CompletedProcess; fails the test with the combined output on a non-zero exit
    unless ``check=False``.
    """

    def run(script, *args, nproc: int = 1, timeout: int = 600, check: bool = True, env=None):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            str(script),
            *map(str, args),
        ]
        e = dict(os.environ)
        e.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")])
        if env:
            e.update(env)
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=str(REPO)
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"torchrun {script} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
                f"\n--- stderr ---\n{proc.stderr[-8000:]}"
            )
        return proc

    return run


def parse_result(stdout: str) -> dict:
    """Workers print one ``RESULT {json}`` line on rank 0; return that object."""
    for line in stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(f"no RESULT line in worker output:\n{stdout[-3000:]}")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer in Qwen2's shape (ChatML template, 600 ids)."""
    from sfmed.utils.tiny import make_tiny_tokenizer

    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok") / "tok")
