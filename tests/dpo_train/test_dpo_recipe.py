"""The DPO recipe in-process (no process group): data resolution and config errors before any
work, the items' pair layout, the loss function's invariance to the micro-batch cut (checked
against a by-hand computation), the reference store's key, and the real entry's exit 2."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from dpo_helpers import random_pairs, write_preference_dataset

from conftest import REPO
from sfmed.core.errors import ConfigError

VOCAB = 1000


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_recipe")
    rng = np.random.default_rng(3)
    pairs = random_pairs(16, rng, VOCAB)
    packed = [pairs[i : i + 2] for i in range(0, 16, 2)]  # two pairs per sample
    out = {
        "packed": write_preference_dataset(tmp / "p_preference", packed, 128, VOCAB, True),
        "single": write_preference_dataset(
            tmp / "s_preference", [[p] for p in pairs], 32, VOCAB, False
        ),  # fmt: skip
    }
    out["sft"] = write_preference_dataset(tmp / "x_sft", [pairs[:1]], 64, VOCAB, False, "sft")
    out["pairs"] = pairs
    return out


def compose(overrides):
    from test_dpo_config import compose as _compose

    return _compose(["device=cpu", *overrides])


def plan_for(overrides, world=1):
    from sfmed.recipes.dpo import DPORecipe
    from sfmed.train.plan import make_plan

    cfg = compose(overrides)
    return cfg, make_plan(cfg, DPORecipe(cfg), world_size=world)


def test_sample_length_and_pairs(data, tmp_path):
    free = ["dpo.reference_free=true", f"ckpt_dir={tmp_path}/r"]
    _, plan = plan_for([f"data.prefix={data['packed']}", *free])
    d = plan.recipe
    assert plan.seq_length == 128 and d.seq_length == 128 and d.max_pairs == 2 and d.samples == [8]
    assert d.reference is None
    # unpacked data: a sample is both sides of one pair, each up to chat.seq_length
    _, plan = plan_for([f"data.prefix={data['single']}", *free])
    assert plan.seq_length == 64 and plan.recipe.max_pairs == 1


@pytest.mark.parametrize(
    "key,extra,match",
    [
        (None, [], r"no preference data: set data.prefix=.*format=preference"),
        ("missing", [], r"is not a complete preference dataset .*format=preference"),
        ("sft", [], r"holds 'sft' data, not preference"),
        ("packed", ["data.seq_length=32"], r"chat.seq_length=128 > data.seq_length=32"),
        ("single", ["data.seq_length=40"], r"data.seq_length=40 is shorter than the longest"),
        ("packed", ["dpo.reference_free=false"], r"DPO needs a reference model: set init_from="),
        ("packed", ["reference.checkpoint=/nonexistent/ref"],
         r"reference.checkpoint=/nonexistent/ref: checkpoint path .* does not exist"),
    ],
)  # fmt: skip
def test_bad_settings_fail_before_work(data, tmp_path, key, extra, match):
    prefix = [] if key is None else [f"data.prefix={data.get(key, tmp_path / 'nope')}"]
    with pytest.raises(ConfigError, match=match):
        plan_for([*prefix, f"ckpt_dir={tmp_path}/r", *extra])
    assert not (tmp_path / "r").exists()


def _samples(data_key, data, tmp_path, gbs=8, overrides=()):
    from sfmed.recipes.dpo import PreferenceSamples
    from sfmed.recipes.sft import split_parts

    cfg, plan = plan_for([f"data.prefix={data[data_key]}", "dpo.reference_free=true",
                          f"ckpt_dir={tmp_path}/r", *overrides])  # fmt: skip
    parts, _ = split_parts(plan.recipe, (100.0, 0.0, 0.0), 1234)
    return cfg, PreferenceSamples(plan.recipe, parts, 2 * gbs, 1234, gbs)


def test_items_keep_each_pair_in_one_sample(data, tmp_path):
    _, ds = _samples("packed", data, tmp_path)
    item = ds[0]
    raw = ds.raw(0)
    lens = raw["seq_lengths"]
    assert len(lens) == 4 and item["pairs"] == 2 and item["tokens"].shape == (128,)
    seg = item["segment"]
    starts = np.concatenate([[0], np.cumsum(lens)])
    for k in range(4):  # chosen = even side, rejected = odd, padding = -1
        assert (seg[starts[k] : starts[k + 1]] == k).all()
    assert (seg[starts[-1] :] == -1).all() and (item["loss_mask"][seg == -1] == 0).all()
    # position ids restart on every side: THD boundaries at each side of each pair
    assert (item["position_ids"][starts[:-1]] == 0).all()
    # RPO's normaliser: the chosen tokens and pairs of the sample's whole global batch
    tot = np.zeros(2)
    for j in range(8):
        r = ds.raw(j)
        side = np.repeat(np.arange(len(r["seq_lengths"])), r["seq_lengths"])
        tot += [r["loss_mask"][side % 2 == 0].sum(), len(r["seq_lengths"]) // 2]
    assert np.array_equal(item["batch_chosen"], tot) and np.array_equal(ds[7]["batch_chosen"], tot)


def _by_hand(items, ce, ref, beta, alpha, loss_type):
    """Mean loss over the pairs of ``items`` from the published formulas, with plain loops."""
    losses, nll, n_chosen = [], 0.0, 0
    for it, ce_i, ref_i in zip(items, ce, ref, strict=True):
        seg, mask = it["segment"], it["loss_mask"]
        for k in range(int(it["pairs"])):
            c = -sum(ce_i[t] for t in range(len(seg)) if seg[t] == 2 * k and mask[t])
            r = -sum(ce_i[t] for t in range(len(seg)) if seg[t] == 2 * k + 1 and mask[t])
            nc = sum(1 for t in range(len(seg)) if seg[t] == 2 * k and mask[t])
            nr = sum(1 for t in range(len(seg)) if seg[t] == 2 * k + 1 and mask[t])
            c0, r0 = ref_i[k]
            if loss_type == "sigmoid":
                h = (c - c0) - (r - r0)
                losses.append(math.log1p(math.exp(-beta * h)))
            else:  # ipo
                h = (c - c0) / nc - (r - r0) / nr
                losses.append((h - 1 / (2 * beta)) ** 2)
            nll += -c
            n_chosen += nc
    mean = sum(losses) / len(losses)
    if alpha is not None:
        mean += alpha * nll / n_chosen
    return mean


@pytest.mark.parametrize("loss_type,alpha", [("sigmoid", None), ("sigmoid", 0.5), ("ipo", 1.0)])
def test_loss_is_the_global_pair_mean_for_any_cut(data, tmp_path, loss_type, alpha):
    from sfmed.recipes.dpo import loss_func

    over = [f"dpo.loss_type={loss_type}", f"dpo.rpo_alpha={alpha if alpha else 'null'}"]
    cfg, ds = _samples("packed", data, tmp_path, overrides=over)
    cfg.dpo.reference_free = False
    gen = torch.Generator().manual_seed(0)
    items = [ds[i] for i in range(8)]
    ce = torch.rand(8, 128, generator=gen, dtype=torch.float64) * 3
    ref = -torch.rand(8, 2, 2, generator=gen, dtype=torch.float64) * 40
    for i, it in enumerate(items):
        it["ref"] = ref[i].numpy()
    expected = _by_hand(items, ce.tolist(), ref.tolist(), cfg.dpo.beta, alpha, loss_type)
    grads = []
    for mbs in (8, 2, 1):
        x = ce.clone().requires_grad_(True)
        total, pairs = 0.0, 0
        reports = []
        for j in range(0, 8, mbs):
            batch = torch.utils.data.default_collate(items[j : j + mbs])
            loss, n, rep = loss_func(cfg, 2, batch, x[j : j + mbs].reshape(1, -1))
            total, pairs = total + loss, pairs + int(n)
            reports.append(rep["dpo"])
        assert pairs == 16
        mean = total / pairs  # what calculate_per_token_loss makes of the sums
        assert float(mean) == pytest.approx(expected, rel=1e-6)  # fp32 sums
        mean.backward()
        grads.append(x.grad)
        summed = torch.stack(reports).sum(0)
        assert float(summed[0]) / float(summed[1]) == pytest.approx(expected, rel=1e-5)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-6, atol=1e-9)


def test_summarize_means_over_pairs_and_nll_per_token(data, tmp_path):
    from sfmed.recipes.dpo import DPO_REPORT, DPORecipe

    cfg = compose([f"data.prefix={data['packed']}", "dpo.rpo_alpha=1.0"])
    sums = dict.fromkeys(DPO_REPORT, 0.0)
    sums.update({"loss": 2.0, "pairs": 4.0, "rewards/margins": 1.0, "rewards/accuracies": 3.0,
                 "nll": 30.0, "chosen_tokens": 10.0})  # fmt: skip
    rep = DPORecipe(cfg).summarize({"dpo": [sums[k] for k in DPO_REPORT], "tokens": [50.0, 64.0]})
    assert rep.loss == 0.5 and rep.loss_tokens == 4.0 and rep.tokens == 50.0
    assert rep.metrics["rewards/accuracies"] == 0.75 and rep.metrics["rewards/margins"] == 0.25
    assert rep.metrics["nll"] == 3.0 and rep.metrics["packing_efficiency"] == 50 / 64


def test_reference_store_is_keyed(tmp_path):
    from sfmed.recipes.dpo import load_reference_table, save_reference_table

    key = {"split": "train", "samples": 3, "reference": {"path": "/ckpt/iter_1", "digest": "a"}}
    table = np.arange(12, dtype=np.float64).reshape(3, 2, 2)
    save_reference_table(tmp_path, "train", key, table)
    assert np.array_equal(load_reference_table(tmp_path, "train", key), table)
    other = {**key, "reference": {"path": "/ckpt/iter_1", "digest": "b"}}  # new weights
    assert load_reference_table(tmp_path, "train", other) is None
    assert load_reference_table(tmp_path, "valid", key) is None
    assert not list((tmp_path / "reference_logps").glob(".*"))  # no temporaries left


@pytest.mark.parametrize(
    "args,match",
    [
        (["dpo.loss_type=kto"], "dpo: error: dpo.loss_type='kto' is not one of"),
        (["reference.checkpoint=/nonexistent/ref"], "dpo: error: reference.checkpoint="),
    ],
)
def test_launch_exits_2_with_one_message(data, tmp_path, args, match):
    run = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/dpo.py"), "device=cpu",
         f"data.prefix={data['packed']}", f"ckpt_dir={run}", *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count(match) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not run.exists()
