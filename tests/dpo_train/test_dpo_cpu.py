"""``torchrun launch/dpo.py`` on CPU (real megatron-core, CPU emulation, gloo, fp32), TP=2×PP=2.

One learnable toy preference set (the chosen answer always recommends seeing a doctor), packed
two pairs per sample, is shared by three runs:

* **A** (precompute, mbs=2, 20 steps): the step-0 gate (policy = reference: loss ln 2 ± 1e-5,
  rewards 0), then preference accuracy rises clearly above 0.5 and the margin grows; the
  reference log-probs are stored beside the run with their key.
* **C** (resumed from A's step-16 checkpoint in a fresh folder, reference **on the fly**: a
  second frozen model scores each step): steps 17-20 repeat A's bit for bit, so resume works and
  the two reference modes give the same numbers.
* **D** (DP=2 × mbs=1 at TP=PP=1, precompute): steps 1-3 agree with A's (DP=1 × mbs=2 at
  TP=2×PP=2): loss and gradients do not depend on the micro-batch / data-parallel cut.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from dpo_helpers import convert_tiny, metrics, preprocess_pairs, run, toy_pairs

from conftest import REPO

STEPS = 20
SAVE = 16
COMMON = [
    "device=cpu", "model=tiny", "logging.level=WARNING", "data.num_workers=0",
    "train.global_batch_size=4", "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=1",
    f"optim.decay_steps={STEPS}", "dpo.beta=0.1",
]  # fmt: skip


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("dpo_cpu")
    ckpt = convert_tiny(tmp, tiny_tokenizer_dir)
    prefix = preprocess_pairs(toy_pairs(64), tiny_tokenizer_dir, tmp / "data", 256, pack=True)
    return tmp, ckpt, prefix


def dpo(nproc: int, *args: str):
    """launch/dpo.py under torchrun on CPU."""
    return run([str(REPO / "launch/dpo.py"), *COMMON, *args], "dpo", nproc=nproc)


@pytest.mark.dist
@pytest.mark.slow
def test_tp2pp2_gate_reference_modes_cuts_learning_resume(toy):
    tmp, ckpt, prefix = toy
    from sfmed.data.chat.store import PreferenceDataset

    ds = PreferenceDataset(prefix)
    assert all(len(ds[i]["seq_lengths"]) == 4 for i in range(len(ds)))  # two pairs per pack
    base = [f"init_from={ckpt}", f"data.prefix={prefix}"]
    a = tmp / "a"
    dpo(4, *base, "parallel=tp2pp2", "train.micro_batch_size=2", f"train.steps={STEPS}",
        f"train.save_interval={SAVE}", f"ckpt_dir={a}")  # fmt: skip
    ma = metrics(a)
    assert sorted(ma) == list(range(1, STEPS + 1))

    # the gate: policy = reference at step 1
    first = ma[1]
    assert abs(first["loss"] - math.log(2)) <= 1e-5, first["loss"]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[k]) <= 1e-5, (k, first[k])
    assert first["pairs"] == 8 and first["tokens"] == 8  # 4 packs × 2 pairs, the loss's count
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    assert "nll" not in first  # only with rpo_alpha
    # the first global batch's real tokens, from the data by hand (seeded permutation)
    perm = np.random.default_rng([1234, 0, 0]).permutation(
        np.random.default_rng([1234, 0, 2**31 - 1]).permutation(len(ds))
    )
    real = sum(int(ds[int(i)]["tokens"].shape[0]) for i in perm[:4])
    assert first["real_tokens"] == real
    assert first["packing_efficiency"] == pytest.approx(real / (4 * 256))

    # learning: accuracy clearly above chance, margins growing
    acc = [ma[s]["rewards/accuracies"] for s in range(1, STEPS + 1)]
    margin = [ma[s]["rewards/margins"] for s in range(1, STEPS + 1)]
    assert np.mean(acc[-5:]) >= 0.9, acc
    assert np.mean(margin[-5:]) > 0.5 and np.mean(margin[-5:]) > np.mean(margin[1:6]), margin
    assert ma[STEPS]["loss"] < 0.5 * math.log(2)
    side = json.loads((a / "reference_logps" / "train.json").read_text())
    assert side["key"]["samples"] == STEPS * 4 and side["key"]["reference"]["path"].endswith(
        "release"
    )
    table = np.load(a / "reference_logps" / "train.npy")
    assert table.shape == (STEPS * 4, 2, 2) and (table < 0).all()
    sj = json.loads((a / f"iter_{STEPS:07d}" / "sfmed.json").read_text())
    assert sj["origin"]["kind"] == "dpo" and sj["origin"]["dpo"]["loss_type"] == "sigmoid"

    # D: data-parallel 2 at TP=PP=1
    d = tmp / "d"
    dpo(2, *base, "parallel.tp=1", "parallel.pp=1", "train.micro_batch_size=1", "train.steps=3",
        "train.save_interval=0", "train.save_final=false", f"ckpt_dir={d}")  # fmt: skip
    md = metrics(d)
    for s in (1, 2, 3):
        # step 1: the same weights (float rounding only); later steps go through Adam, which
        # divides rounding-level gradient differences by tiny second moments
        tol = 1e-5 if s == 1 else 1e-4
        for k in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"):
            x, y = md[s][k], ma[s][k]
            assert abs(x - y) <= tol * max(abs(y), 1e-2), (s, k, x, y)

    # C: resume from A's step-16 checkpoint, reference on the fly: the rest of A bit for bit
    c = tmp / "c"
    c.mkdir()
    for sub in (f"iter_{SAVE:07d}", "hf"):
        shutil.copytree(a / sub, c / sub)
    (c / "latest_checkpointed_iteration.txt").write_text(str(SAVE))
    dpo(4, *base, "parallel=tp2pp2", "train.micro_batch_size=2", f"train.steps={STEPS}",
        "reference.mode=on_the_fly", "train.save_final=false", f"ckpt_dir={c}")  # fmt: skip
    mc = metrics(c)
    assert sorted(mc) == list(range(SAVE + 1, STEPS + 1))
    assert not (c / "reference_logps").exists()  # nothing precomputed
    for s in range(SAVE + 1, STEPS + 1):
        for k in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert mc[s][k] == ma[s][k], (s, k, mc[s][k], ma[s][k])
