"""The DPO parity gate: the sharded engine (``torchrun launch/dpo.py``, megatron-core, TP=1)
and the HF engine (TRL ``DPOTrainer``, full-parameter) train the same tiny Qwen2 on the same
pairs in the same order with the same optimizer settings; their per-step loss, grad norm and
reward margin agree to 1e-4 relative over 10 steps (fp32, CPU), for sigmoid and for IPO. The
HF side trained as sigmoid while the sharded one runs IPO (loss_type ignored: the ms-swift bug)
breaks the gate at step 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dpo_hf_helpers import COMMON, REPO, engine_cfg, metrics

from sfmed.hf_engine.dpo import run
from sfmed.hf_engine.parity import compare_runs

pytest_plugins = ["dpo_hf_fixtures"]

STEPS = 10
RTOL = 1e-4
LOSSES = {"sigmoid": ["dpo.loss_type=sigmoid"], "ipo": ["dpo.loss_type=ipo", "dpo.beta=0.5"]}
pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _env():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharded(prefix: str, init: Path, run_dir: Path, *args: str) -> Path:
    """``torchrun launch/dpo.py`` (engine=mcore, one process) for STEPS steps."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
        "--master_addr=127.0.0.1", f"--master_port={_port()}", str(REPO / "launch" / "dpo.py"),
        *COMMON, f"data.prefix={prefix}", f"init_from={init}", f"ckpt_dir={run_dir}",
        f"train.steps={STEPS}", "train.micro_batch_size=2", "train.save_final=false", *args,
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env(), cwd=REPO)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return run_dir


def hf(model: Path, prefix: str, run_dir: Path, *args: str) -> Path:
    """The HF engine in process for STEPS steps (mbs=1 x 4 micro-batches)."""
    cfg = engine_cfg(
        model, prefix, run_dir, f"train.steps={STEPS}", "train.micro_batch_size=1",
        "train.save_final=false", *args,
    )  # fmt: skip
    assert run(cfg) == "complete"
    return run_dir


def padded_hf_model(src: Path, ck: Path, out: Path) -> Path:
    """``src`` with its vocabulary padded as the converted checkpoint's (zero rows up to its
    ``padded_vocab_size``): megatron's softmax runs over those rows, so the two engines compute
    the same function only when the HF model has them too (real Qwen2 folders do)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    padded = int(json.loads((ck / "release" / "sfmed.json").read_text())["padded_vocab_size"])
    model = AutoModelForCausalLM.from_pretrained(src)
    n = model.config.vocab_size
    assert padded > n  # the tiny model's 1000 ids pad to 1024: the case to account for
    model.resize_token_embeddings(padded, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[n:] = 0
        model.get_output_embeddings().weight[n:] = 0
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gate(dpo_model, pairs_prefix, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_parity")
    ck = tmp / "mcore"
    p = subprocess.run(
        [sys.executable, str(REPO / "launch/convert.py"), "to=mcore", f"src={dpo_model}",
         f"dst={ck}"],
        capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    model = padded_hf_model(dpo_model, ck, tmp / "hf_padded")
    out = {"tmp": tmp, "model": model}
    for name, args in LOSSES.items():
        out[f"mcore_{name}"] = sharded(pairs_prefix, ck, tmp / f"mcore_{name}", *args)
        out[f"hf_{name}"] = hf(model, pairs_prefix, tmp / f"hf_{name}", *args)
    return out


@pytest.mark.parametrize("loss", list(LOSSES))
def test_engines_agree(gate, loss):
    a, b = gate[f"mcore_{loss}"], gate[f"hf_{loss}"]
    ref = metrics(b)
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert ref[-1]["loss"] < ref[0]["loss"] and ref[-1]["rewards/margins"] > 0  # it trained
    rows, failures = compare_runs(a, b, rtol=RTOL)
    assert len(rows) == STEPS and not failures, failures
    assert all(r["rewards/margins_a"] is not None for r in rows)


def test_ignoring_loss_type_breaks_the_gate(gate):
    # The HF run trained as sigmoid is what an engine that drops loss_type=ipo would log.
    _, failures = compare_runs(gate["mcore_ipo"], gate["hf_sigmoid"], rtol=RTOL)
    assert failures and failures[0]["step"] == 1
