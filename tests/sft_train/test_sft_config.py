"""SFT configs and data resolution: the YAML validates, bad values and data that cannot work fail
before any work (in the schema or in ``make_plan``), the real entry exits 2, and the sample order
of a blend follows its weights. All in-process and fast, except one subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sft_train_helpers import random_conversations, write_sft_dataset

from conftest import REPO
from sfmed.config.sft import SFTConfig, register
from sfmed.core.errors import ConfigError

CONF = REPO / "conf"


def compose(overrides: list[str]) -> SFTConfig:
    """The typed config launch/sft.py would get for ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="sft", overrides=overrides)
    return OmegaConf.to_object(cfg)


def _plan(overrides, world=1):
    from sfmed.recipes.sft import SFTRecipe
    from sfmed.train.plan import make_plan

    cfg = compose(["device=cpu", *overrides])
    return make_plan(cfg, SFTRecipe(cfg), world_size=world)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_cfg")
    rng = np.random.default_rng(0)
    out = {}
    for name, n, seq in (("a", 6, 64), ("b", 3, 64), ("long", 4, 128)):
        convs = random_conversations(n, rng, 5, 20, 1000)
        out[name] = write_sft_dataset(tmp / f"{name}_sft", [[c] for c in convs], seq, 1000)
    big = random_conversations(2, rng, 5, 20, 1000)
    out["bigvocab"] = write_sft_dataset(tmp / "bv_sft", [[c] for c in big], 64, 5000)
    pref = write_sft_dataset(tmp / "p_preference", [[c] for c in big], 64, 1000)
    side = Path(f"{pref}.json")
    side.write_text(side.read_text().replace('"kind": "sft"', '"kind": "preference"'))
    from sfmed.data.chat.store import complete_meta

    assert complete_meta(pref)["kind"] == "preference"
    out["pref"] = pref
    return out


def test_default_yaml_validates_and_engines():
    cfg = compose([])
    assert isinstance(cfg, SFTConfig) and cfg.engine == "mcore" and cfg.run_name == "sft"
    assert cfg.data.prefix is None and cfg.data.split_weights == (100.0, 0.0, 0.0)
    hf = compose(["engine=hf", "hf.lora.enabled=true", "hf.lora.r=8", "hf.model=/m"])
    assert hf.engine == "hf" and hf.hf.lora.r == 8 and "q_proj" in hf.hf.lora.target_modules
    import json

    from sfmed.train.trainer import config_to_dict

    assert json.loads(json.dumps(config_to_dict(cfg)))["data"]["split"] == "100,0,0"


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["engine=trl"], r"engine='trl' is not one of \['mcore', 'hf'\]"),
        (["data.mask=first"], r"data.mask='first' is not one of"),
        (["data.seq_length=8"], r"data.seq_length=8 must be >= 16"),
        (["data.prefix=x", "data.blend=[{prefix: y}]"], r"data.prefix and data.blend are both"),
        (["data.blend=[{prefix: y, weight: -1}]"], r"data.blend\[0\].weight=-1 must be"),
        (["data.blend=[{weight: 1}]"], r"data.blend\[0\].*needs a prefix"),
        (["data.split='0,1,0'"], r"data.split='0,1,0' must be"),
        (["data.num_workers=-1"], r"data.num_workers=-1 must be >= 0"),
    ],
)
def test_bad_values_fail_in_the_schema(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose(overrides)


def test_plan_resolves_the_data(datasets, tmp_path):
    plan = _plan([f"data.prefix={datasets['a']}", f"ckpt_dir={tmp_path}/r"])
    d = plan.recipe
    assert plan.seq_length == 64 and d.seq_length == 64 and d.samples == [6]
    assert d.pad_id == 0 and d.weights == [1.0]
    blend = f"data.blend=[{{prefix: {datasets['a']}, weight: 3}}, {{prefix: {datasets['b']}}}]"
    d = _plan([blend, f"ckpt_dir={tmp_path}/r", "data.pad_id=7"]).recipe
    assert d.weights == [0.75, 0.25] and d.samples == [6, 3] and d.pad_id == 7
    # a longer data.seq_length pads; the schedules run at it
    assert _plan([f"data.prefix={datasets['a']}", "data.seq_length=96",
                  f"ckpt_dir={tmp_path}/r"]).seq_length == 96  # fmt: skip


@pytest.mark.parametrize(
    "key,extra,match",
    [
        ("missing", [], r"is not a complete SFT dataset .*launch/preprocess.py format=sft"),
        ("bin", [], r"without the extension"),
        ("pref", [], r"holds 'preference' data, not sft"),
        ("long", ["data.seq_length=64"], r"chat.seq_length=128 > data.seq_length=64"),
        ("a", ["data.mask=last"], r"chat.mask='all', not data.mask='last'"),
        ("a", ["data.packed=true"], r"chat.pack=false, not data.packed=true"),
        ("bigvocab", [], r"vocabulary of 5000 tokens but the model has 1000"),
        ("a", ["train.eval_interval=5"], r"has no validation part"),
        (None, [], r"no SFT data: set data.prefix="),
        (
            "a",
            ["model.transformer_impl=local", "model.attention_backend=unfused"],
            r"attention_backend=unfused: megatron's DotProductAttention refuses packed",
        ),
    ],
)
def test_data_that_cannot_work_fails_before_work(datasets, tmp_path, key, extra, match):
    prefix = {"missing": tmp_path / "nope_sft", "bin": f"{datasets['a']}.bin"}.get(
        key, datasets.get(key)
    )
    args = ([f"data.prefix={prefix}"] if key else []) + [f"ckpt_dir={tmp_path}/r", *extra]
    with pytest.raises(ConfigError, match=match):
        _plan(args)
    assert not (tmp_path / "r").exists()


def test_context_parallelism_is_refused():
    # (without Transformer Engine the plan refuses cp > 1 already; with it, the recipe does)
    from sfmed.recipes.sft import SFTRecipe

    cfg = compose(["parallel.cp=2", "data.prefix=x"])
    with pytest.raises(ConfigError, match=r"parallel.cp=2: SFT packs run with context"):
        SFTRecipe(cfg).resolve(None)


def test_blend_of_different_seq_lengths_needs_data_seq_length(datasets, tmp_path):
    blend = f"data.blend=[{{prefix: {datasets['a']}}}, {{prefix: {datasets['long']}}}]"
    with pytest.raises(ConfigError, match=r"different seq_lengths \[64, 128\]; set data.seq"):
        _plan([blend, f"ckpt_dir={tmp_path}/r"])
    assert _plan([blend, "data.seq_length=128", f"ckpt_dir={tmp_path}/r"]).seq_length == 128


def test_blend_order_follows_weights_and_is_seeded(datasets):
    from sfmed.recipes.sft import SFTData, SFTSamples, blend_index, split_parts

    which, nth = blend_index([0.75, 0.25], 400)
    assert (which == 0).sum() == 300 and (which == 1).sum() == 100
    for k in (0, 1):  # each dataset's draws are numbered 0, 1, 2, ...
        assert nth[which == k].tolist() == list(range((which == k).sum()))
    data = SFTData([str(datasets["a"]), str(datasets["b"])], [0.5, 0.5], 64, 0, [6, 3])
    train, valid = split_parts(data, (2.0, 1.0, 0.0), seed=5)
    assert [len(p) for p in train] == [4, 2] and [len(p) for p in valid] == [2, 1]
    for t, v in zip(train, valid, strict=True):
        assert not set(t) & set(v)
    ds = SFTSamples(data, train, 24, seed=5)
    again = SFTSamples(data, train, 24, seed=5)
    from sfmed.data.chat.store import SFTDataset

    raw_a = SFTDataset(datasets["a"])
    firsts = set()
    for i in range(24):
        s, s2 = ds[i], again[i]
        assert all(np.array_equal(s[k], s2[k]) for k in s)
        assert s["tokens"].shape == (64,) and s["real"].sum() <= 64
        if ds.which[i] == 0:
            n = int(s["real"].sum())
            hits = [j for j in train[0] if np.array_equal(raw_a[j]["tokens"], s["tokens"][:n])]
            assert len(hits) == 1  # only the train part is drawn
            if ds.nth[i] < 4:
                firsts.add(hits[0])
    assert firsts == set(train[0].tolist())  # the first epoch covers the part once
    # padding: its own sequence (positions from 0), no loss, no labels into it
    s = ds[0]
    n = int(s["real"].sum())
    assert s["position_ids"][n] == 0 and s["loss_mask"][n - 1 :].sum() == 0


def test_loss_func_and_summary_by_hand():
    from sfmed.recipes.sft import SFTRecipe, loss_func

    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    real = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, count, rep = loss_func(mask, real, per_token)
    assert float(loss) == 4.0 and int(count) == 2
    assert rep["lm loss"].tolist() == [4.0, 2.0] and rep["tokens"].tolist() == [3.0, 4.0]
    r = SFTRecipe(SFTConfig()).summarize({"lm loss": [10.0, 4.0], "tokens": [6.0, 8.0]})
    assert (r.loss, r.loss_tokens, r.tokens) == (2.5, 4.0, 6.0)
    assert r.metrics == {"real_tokens": 6.0, "packing_efficiency": 0.75,
                         "supervised_fraction": 0.5}  # fmt: skip
    empty = SFTRecipe(SFTConfig()).summarize({"lm loss": [0.0, 0.0], "tokens": [0.0, 0.0]})
    assert empty.loss == 0.0 and empty.metrics["packing_efficiency"] == 0.0


def test_launch_refuses_bad_data_before_any_work(tmp_path):
    """The real entry point: exit code 2, one message naming value and fix, nothing written."""
    run = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/sft.py"), "device=cpu",
         f"data.prefix={tmp_path}/nope_sft", f"ckpt_dir={run}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("sft: error: data.prefix=") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not run.exists()
