"""``engine=hf`` in process on a tiny Qwen2: the loss is the global-batch per-token mean
(checked against conversations run one by one with plain transformers), independent of the
micro-batch split; megatron-core's LR schedule; the run folder and the export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hf_helpers import engine_cfg, first_samples, metrics, reference_loss_and_grad

from sfmed.core.errors import ConfigError, UserError
from sfmed.data.chat.store import SFTDataset
from sfmed.hf_engine.sft import run

pytest_plugins = ["hf_fixtures"]

SPLITS = {"mbs2_ga2": 2, "mbs1_ga4": 1, "mbs4_ga1": 4}


@pytest.fixture(scope="module")
def runs(hf_model, packed_prefix, tmp_path_factory):
    """The same 3 steps cut into different micro-batches (one run exports the model)."""
    tmp = tmp_path_factory.mktemp("hf_runs")
    out = {}
    for name, mbs in SPLITS.items():
        save = "true" if name == "mbs2_ga2" else "false"
        cfg = engine_cfg(
            hf_model, packed_prefix, tmp / name, f"train.micro_batch_size={mbs}",
            f"train.save_final={save}",
        )  # fmt: skip
        assert run(cfg) == "complete"
        out[name] = tmp / name
    return out


def _first_batch(prefix: str) -> list[int]:
    return first_samples(prefix, 4)


@pytest.mark.slow  # three engine runs, shared
def test_step_loss_is_the_global_token_mean(runs, hf_model, packed_prefix):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_model)
    loss, norm, count = reference_loss_and_grad(model, packed_prefix, _first_batch(packed_prefix))
    r = metrics(runs["mbs2_ga2"])[0]
    assert r["step"] == 1 and r["tokens"] == count
    assert r["loss"] == pytest.approx(loss, rel=1e-5)
    assert r["grad_norm"] == pytest.approx(norm, rel=1e-5)
    ds = SFTDataset(packed_prefix)
    real = sum(len(ds[i]["tokens"]) for i in _first_batch(packed_prefix))
    assert r["real_tokens"] == real
    assert r["packing_efficiency"] == pytest.approx(real / (4 * ds.seq_length))
    assert r["supervised_fraction"] == pytest.approx(count / (4 * ds.seq_length))
    assert r["loss_tokens_per_s"] == pytest.approx(r["tokens_per_s"] * count / real)


@pytest.mark.slow  # three engine runs, shared
def test_microbatch_split_does_not_change_loss_or_grads(runs):
    ref = metrics(runs["mbs2_ga2"])
    assert [r["step"] for r in ref] == [1, 2, 3]
    for name in SPLITS:
        got = metrics(runs[name])
        for a, b in zip(got, ref, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (name, a["step"])
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), (name, a["step"])
            assert a["tokens"] == b["tokens"]
    assert len({r["loss"] for r in ref}) == 3


@pytest.mark.slow  # three engine runs, shared
def test_lr_follows_megatrons_schedule(runs):
    # warmup 2 steps from 0, then cosine to min_lr over train.steps=3; step k runs at the
    # schedule's value at k, as the sharded engine does: by hand, megatron-core's formula
    def lr(n, peak=1e-3, low=1e-4, warm=2, decay=3):
        if n <= warm:
            return peak * n / warm
        ratio = (n - warm) / (decay - warm)
        return low + 0.5 * (math.cos(math.pi * ratio) + 1) * (peak - low)

    got = [r["lr"] for r in metrics(runs["mbs2_ga2"])]
    assert got == pytest.approx([lr(n) for n in (1, 2, 3)])
    assert got == pytest.approx([5e-4, 1e-3, 1e-4])


@pytest.mark.slow  # three engine runs, shared
def test_run_folder_and_export(runs, hf_model):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = runs["mbs2_ga2"]
    st = json.loads((d / "status.json").read_text())
    assert st == {"status": "complete", "iteration": 3, "steps": 3, "reason": ""}
    out = d / "hf"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    before, after = load_file(hf_model / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "头痛"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids.shape[1]
    assert not (runs["mbs1_ga4"] / "hf").exists()  # save_final=false
    keys = set(metrics(d)[0])
    assert {"step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s"} <= keys


@pytest.mark.slow
def test_per_microbatch_normalisation_is_caught(hf_model, unpacked_prefix, tmp_path, monkeypatch):
    """Without the global token count, transformers averages per micro-batch (the gradient-
    accumulation bug): the step loss no longer equals the global token mean."""
    from transformers import AutoModelForCausalLM, Trainer

    monkeypatch.setattr(Trainer, "_get_num_items_in_batch", lambda self, *a, **k: None)
    cfg = engine_cfg(
        hf_model, unpacked_prefix, tmp_path / "r", "train.steps=1", "train.micro_batch_size=1",
        "optim.warmup_steps=0", "train.save_final=false",
    )  # fmt: skip
    assert run(cfg) == "complete"
    model = AutoModelForCausalLM.from_pretrained(hf_model)
    loss, _, _ = reference_loss_and_grad(model, unpacked_prefix, _first_batch(unpacked_prefix))
    got = metrics(tmp_path / "r")[0]["loss"]
    # well beyond the parity gate's 1e-4 (a random tiny model's token losses are all close to
    # log(vocab), so the two means differ little; the gate compares trained steps too)
    assert abs(got - loss) > 3e-4 * loss


@pytest.mark.slow  # two engine runs
def test_validation_is_the_token_mean_over_the_validation_samples(
    hf_model, unpacked_prefix, tmp_path
):
    """``train.eval_interval`` on the HF engine: the sharded engine's validation samples
    (``train.eval_iters`` global batches of the validation part, seed + 1), their loss the
    mean over every supervised token -- recomputed here one conversation at a time with plain
    transformers on the exported weights -- logged as ``valid_loss``; training is unchanged."""
    from transformers import AutoModelForCausalLM

    args = ["train.steps=2", "data.split=50/50/0", "optim.warmup_steps=0"]
    cfg = engine_cfg(
        hf_model, unpacked_prefix, tmp_path / "v", *args, "train.eval_interval=2",
        "train.eval_iters=1",
    )  # fmt: skip
    assert run(cfg) == "complete"
    records = metrics(tmp_path / "v")
    valid = [r for r in records if "valid_loss" in r]
    assert [r["step"] for r in valid] == [2]
    # the documented order: the validation part is the second half of the seeded permutation
    # of the 48 samples, drawn in a permutation seeded by (seed + 1, dataset 0, epoch 0)
    seed = cfg.train.seed
    part = np.random.default_rng([seed, 0, 2**31 - 1]).permutation(48)[24:]
    samples = part[np.random.default_rng([seed + 1, 0, 0]).permutation(24)][:4].tolist()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "v" / "hf")  # weights after step 2
    loss, _, count = reference_loss_and_grad(model, unpacked_prefix, samples)
    assert valid[0]["valid_loss"] == pytest.approx(loss, rel=1e-5)
    ds = SFTDataset(unpacked_prefix)
    assert valid[0]["valid_supervised_fraction"] == pytest.approx(count / (4 * ds.seq_length))
    # the same run without validation trains the same steps
    assert run(engine_cfg(hf_model, unpacked_prefix, tmp_path / "n", *args)) == "complete"
    train = [r for r in records if "loss" in r]
    for a, b in zip(train, metrics(tmp_path / "n"), strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], a["step"]


def test_config_errors_before_work(hf_model, packed_prefix, tmp_path, monkeypatch):
    def cfg(*o, model=hf_model, prefix=packed_prefix):
        return engine_cfg(model, prefix, tmp_path / "r", *o)

    cases = [
        (cfg(model=tmp_path / "none"), r"hf.model=.*not a Hugging Face folder"),
        (cfg("hf.model=null"), r"engine=hf needs hf.model"),
        (cfg(f"init_from={tmp_path}"), r"init_from=.*drop init_from"),
        (cfg("parallel.tp=2"), r"data parallel only.*accelerate launch"),
        (cfg("data.prefix=null"), r"no SFT data"),
        (cfg(prefix=str(tmp_path / "nodata")), r"data.prefix=.*not a complete SFT dataset"),
        (cfg("optim.warmup_steps=3"), r"optim.warmup_steps=3 must be smaller"),
        (cfg("train.eval_interval=5"), r"train.eval_interval=5 but data.split=.*no validation"),
        (cfg("hf.export=all"), r"hf.export='all'"),
        (cfg("data.seq_length=64"), r"chat.seq_length=256 > data.seq_length=64"),
        (cfg("data.packed=false"), r"chat.pack=true, not data.packed=false"),
        (cfg("hf.lora.enabled=true", "hf.lora.r=0"), r"hf.lora: r=0"),
        (cfg("train.precision=fp8"), r"fp8 needs engine=mcore"),
    ]
    for c, match in cases:
        with pytest.raises(ConfigError, match=match):
            run(c)
    with monkeypatch.context() as m:  # 3 processes (accelerate launch) cannot split 4 by 2
        m.setenv("WORLD_SIZE", "3")
        with pytest.raises(ConfigError, match=r"micro_batch_size=2 x 3 processes"):
            run(cfg())
    assert not (tmp_path / "r").exists()  # nothing written
    (tmp_path / "r" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "r" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match=r"checkpoint-2.*resume=never"):
        run(cfg("resume=never"))
    with pytest.raises(ConfigError, match=r"resume=.* not an HF engine checkpoint"):
        run(cfg(f"resume={tmp_path}"))
    np.testing.assert_equal(sorted(p.name for p in (tmp_path / "r").iterdir()), ["checkpoint-2"])
