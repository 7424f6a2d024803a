"""One-GPU smoke run in bf16 from a converted checkpoint (skipped without CUDA)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.gpu


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bf16_smoke_run_from_a_converted_checkpoint(tmp_path, tiny_qwen2_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from sfmed.convert import convert_hf_to_mcore

    mcore = tmp_path / "mcore"
    convert_hf_to_mcore(tiny_qwen2_factory(), mcore, progress=False)
    prefix = str(tmp_path / "corpus_text_document")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for i in range(300):
        doc = np.concatenate([np.tile(np.arange(10 + i % 5, 30 + i % 5), 8), [999]])
        b.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    b.finalize(prefix + ".idx")
    run = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
         f"--master_port={_port()}", str(REPO / "launch/pretrain.py"), "device=cuda",
         "train.precision=bf16", "model=tiny", f"init_from={mcore}", f"data.prefix={prefix}",
         "data.seq_length=128", "train.steps=40", "train.global_batch_size=16",
         "train.micro_batch_size=4", "train.save_interval=20", "optim.lr=3e-3",
         "optim.warmup_steps=4", f"ckpt_dir={run}"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    assert recs[-1]["tflops_per_gpu"] > 0 and recs[-1]["mem_alloc_gb"] > 0
    meta = json.loads((run / "iter_0000040" / "sfmed.json").read_text())
    assert meta["arch"]["torch_dtype"] == "bfloat16"
    assert json.loads((run / "status.json").read_text())["status"] == "complete"
