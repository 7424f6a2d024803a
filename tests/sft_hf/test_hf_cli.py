"""``python launch/sft.py engine=hf`` as users run it: run folder, wandb offline, the exit-2
path for bad values, an interrupted run resumed exactly, and data parallel under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hf_helpers import COMMON, REPO, engine_cfg, free_port, metrics

from sfmed.hf_engine.sft import run

pytest_plugins = ["hf_fixtures"]

pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["WANDB_SILENT"] = "true"
    return env


def sft_hf(model, prefix, run_dir, *args, nproc: int = 0):
    """launch/sft.py engine=hf (under torchrun with ``nproc`` processes when > 0)."""
    head = [sys.executable]
    if nproc:
        head += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                 "--master_addr=127.0.0.1", f"--master_port={free_port()}"]  # fmt: skip
    cmd = [
        *head, str(REPO / "launch" / "sft.py"), *COMMON, "engine=hf", f"hf.model={model}",
        f"data.prefix={prefix}", f"ckpt_dir={run_dir}", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=900)


def test_cli_interrupt_resume_and_errors(hf_model, packed_prefix, tmp_path):
    d = tmp_path / "run"
    args = ["train.steps=4", "train.micro_batch_size=2", "train.save_interval=2"]
    # the time limit stops the run after its first step, with a checkpoint
    p = sft_hf(hf_model, packed_prefix, d, *args, "train.exit_duration_minutes=1e-9",
               "logging.wandb.mode=offline")  # fmt: skip
    assert p.returncode == 0, p.stderr[-4000:]
    st = json.loads((d / "status.json").read_text())
    assert st["status"] == "interrupted" and st["iteration"] == 1
    assert st["reason"] == "exit_duration_minutes"
    assert (d / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (d / "hf").exists()
    assert any((d / "wandb").iterdir())
    # resume=auto continues from checkpoint-1 up to train.steps
    p = sft_hf(hf_model, packed_prefix, d, *args)
    assert p.returncode == 0, p.stderr[-4000:]
    st = json.loads((d / "status.json").read_text())
    assert st == {"status": "complete", "iteration": 4, "steps": 4, "reason": ""}
    resumed = metrics(d)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert (d / "hf" / "config.json").is_file()
    # the same run without interruption gives the same steps
    ref_dir = tmp_path / "ref"
    assert run(engine_cfg(hf_model, packed_prefix, ref_dir, *args)) == "complete"
    for a, b in zip(resumed, metrics(ref_dir), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), a["step"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    # a bad value: exit 2, one message naming it, before any work
    p = sft_hf(hf_model, packed_prefix, tmp_path / "bad", "hf.export=all")
    assert p.returncode == 2
    assert p.stderr.count("hf.export='all'") == 1 and not (tmp_path / "bad").exists()


@pytest.mark.dist
def test_data_parallel_matches_one_process(hf_model, packed_prefix, tmp_path):
    """Two processes (gloo DDP through accelerate, as ``accelerate launch`` starts them) x mbs=1
    x 2 micro-batches give the one-process losses and grad norms: the token count is global;
    so is the validation loss (each process scores its share of the validation samples)."""
    args = [
        "train.steps=3", "train.micro_batch_size=1", "train.save_final=false",
        "data.split=80/20/0", "train.eval_interval=3", "train.eval_iters=1",
    ]  # fmt: skip
    p = sft_hf(hf_model, packed_prefix, tmp_path / "dp2", *args, nproc=2)
    assert p.returncode == 0, p.stderr[-6000:]
    assert run(engine_cfg(hf_model, packed_prefix, tmp_path / "one", *args)) == "complete"
    dp2, one = metrics(tmp_path / "dp2"), metrics(tmp_path / "one")
    assert [r["step"] for r in dp2 if "valid_loss" in r] == [3]
    for a, b in zip(dp2, one, strict=True):
        if "valid_loss" in b:
            assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-6)
            assert a["valid_real_tokens"] == b["valid_real_tokens"]
            continue
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), a["step"]
        assert a["tokens"] == b["tokens"]
