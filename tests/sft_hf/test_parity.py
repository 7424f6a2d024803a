"""The parity gate: the sharded engine (``torchrun launch/sft.py``, megatron-core at TP=1 and
TP=2×PP=2) and the HF engine (TRL, full-parameter) train the same tiny Qwen2 on the same
packed data in the same order with the same optimizer settings; their per-step loss and grad
norm agree to 1e-4 relative over 10 steps (fp32, CPU). Two deliberate mistakes on the HF side
break the gate: supervising the ``\\n`` after ``<|im_end|>``, and normalising the loss per
micro-batch instead of over the global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hf_helpers import COMMON, REPO, engine_cfg, free_port, metrics

from sfmed.hf_engine.parity import compare_runs
from sfmed.hf_engine.sft import run

pytest_plugins = ["hf_fixtures"]

STEPS = 10
RTOL = 1e-4
pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _env():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def sharded(nproc: int, prefix: str, init: Path, run_dir: Path, *args: str) -> Path:
    """``torchrun launch/sft.py`` (engine=mcore) for STEPS steps; its run folder."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(REPO / "launch" / "sft.py"), *COMMON, f"data.prefix={prefix}", f"init_from={init}",
        f"ckpt_dir={run_dir}", f"train.steps={STEPS}", "train.micro_batch_size=2",
        "train.save_final=false", *args,
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env(), cwd=REPO)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return run_dir


def hf(model: Path, prefix: str, run_dir: Path, *args: str) -> Path:
    """The HF engine in process for STEPS steps (mbs=1 x 4 micro-batches); its run folder."""
    cfg = engine_cfg(
        model, prefix, run_dir, f"train.steps={STEPS}", "train.micro_batch_size=1",
        "train.save_final=false", *args,
    )  # fmt: skip
    assert run(cfg) == "complete"
    return run_dir


@pytest.fixture(scope="module")
def gate(hf_model, packed_prefix, tmp_path_factory):
    """The converted checkpoint and the three runs of the gate."""
    tmp = tmp_path_factory.mktemp("parity")
    ck = tmp / "mcore"
    p = subprocess.run(
        [sys.executable, str(REPO / "launch/convert.py"), "to=mcore", f"src={hf_model}",
         f"dst={ck}"],
        capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    padded = padded_hf_model(hf_model, ck, tmp / "hf_padded")
    return {
        "ck": ck,
        "tmp": tmp,
        "model": padded,
        "tp1": sharded(1, packed_prefix, ck, tmp / "tp1"),
        "tp2pp2": sharded(4, packed_prefix, ck, tmp / "tp2pp2", "parallel.tp=2", "parallel.pp=2"),
        "hf": hf(padded, packed_prefix, tmp / "hf"),
    }


def padded_hf_model(src: Path, ck: Path, out: Path) -> Path:
    """``src`` with its vocabulary padded the way the converted checkpoint is (zero rows up to
    the checkpoint's ``padded_vocab_size``).

    megatron-core's output layer has those rows too and its softmax runs over them (logit 0 at
    the start, then trained like any row), so the two engines compute the same function only
    when the HF model carries them as well; real Qwen2 folders already do (their ``vocab_size``
    exceeds the tokenizer's).
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((ck / "release" / "sfmed.json").read_text())
    padded = int(meta["padded_vocab_size"])
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


def test_engines_agree(gate):
    ref = metrics(gate["hf"])
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert ref[-1]["loss"] < ref[0]["loss"]  # it trained
    for name in ("tp1", "tp2pp2"):
        rows, failures = compare_runs(gate[name], gate["hf"], rtol=RTOL)
        assert len(rows) == STEPS
        assert not failures, (name, failures)
        for a, b in zip(metrics(gate[name]), ref, strict=True):
            assert a["tokens"] == b["tokens"] and a["lr"] == pytest.approx(b["lr"], rel=1e-12)


def test_training_the_newline_after_im_end_breaks_the_gate(gate, hf_model, packed_prefix):
    """The HF side trained on data whose mask also supervises the ``\\n`` after every
    supervised ``<|im_end|>`` (what some toolchains do) no longer passes."""
    from transformers import AutoTokenizer

    from sfmed.data.chat.store import ChatWriter, SFTDataset

    tok = AutoTokenizer.from_pretrained(hf_model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ds = SFTDataset(packed_prefix)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ids, mask = IndexedDataset(packed_prefix), IndexedDataset(f"{packed_prefix}_mask")
    bad = gate["tmp"] / "newline" / "chats_sft"
    bad.parent.mkdir()
    w = ChatWriter(bad, np.uint16)
    changed = 0
    for s in range(len(ds)):
        a, b = ids.document_indices[s], ids.document_indices[s + 1]
        seqs, masks = [], []
        for k in range(a, b):
            x, m = np.asarray(ids[k]), np.asarray(mask[k]).copy()
            after = np.flatnonzero((x[:-1] == im_end) & (m[:-1] == 1)) + 1
            changed += int((m[after] == 0).sum())
            m[after] = 1
            seqs.append(x.astype(np.uint16))
            masks.append(m.astype(np.uint8))
        w.add_sample(seqs, masks)
    w.finish({k: v for k, v in ds.meta.items() if not k.endswith("_bytes")})
    assert changed > 0
    run_dir = hf(gate["model"], str(bad), gate["tmp"] / "hf_newline")
    _, failures = compare_runs(gate["tp1"], run_dir, rtol=RTOL)
    assert failures and failures[0]["step"] == 1


def test_per_microbatch_normalisation_breaks_the_gate(gate, hf_model, packed_prefix, monkeypatch):
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "_get_num_items_in_batch", lambda self, *a, **k: None)
    run_dir = hf(gate["model"], packed_prefix, gate["tmp"] / "hf_per_mb")
    _, failures = compare_runs(gate["tp1"], run_dir, rtol=RTOL)
    assert failures and failures[0]["step"] == 1
