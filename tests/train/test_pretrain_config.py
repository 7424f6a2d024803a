"""Pretraining configs: every YAML validates against its schema, and bad values fail before work.

All in-process and fast: Hydra's ``compose()`` for the YAML, ``make_plan`` for the checks that
need the world size / files, and one real ``launch/pretrain.py`` run that must refuse to start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from sfmed.config.pretrain import PretrainConfig, register
from sfmed.core import megatron_layout as layout
from sfmed.core.errors import ConfigError
from sfmed.models import arch_to_dict

CONF = REPO / "conf"


def compose(overrides: list[str]) -> PretrainConfig:
    """The typed config launch/pretrain.py would get for ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="pretrain", overrides=overrides)
    return OmegaConf.to_object(cfg)


def _group_files(group: str) -> list[str]:
    pattern = "pretrain_*.yaml" if group == "data" else "*.yaml"
    return sorted(p.stem for p in (CONF / group).glob(pattern))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A tiny indexed dataset (megatron's own builder)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("data") / "tiny_text_document")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for i in range(20):
        b.add_document(torch.arange(i, i + 30) % 1000, [30])
    b.finalize(prefix + ".idx")
    return prefix


@pytest.mark.parametrize(
    "group,name",
    [
        (g, n)
        for g in ("model", "parallel", "optim", "train", "logging", "data")
        for n in _group_files(g)
    ],
)
def test_every_yaml_validates_against_its_schema(group, name):
    cfg = compose([f"{group}={name}"])
    assert isinstance(cfg, PretrainConfig)
    if group == "model":
        arch = cfg.model.arch()
        assert arch.num_attention_heads % arch.num_query_groups == 0


def test_any_field_is_overridable_and_typed():
    cfg = compose(
        ["parallel.tp=2", "parallel.pp=2", "train.global_batch_size=512", "optim.lr=1e-5",
         "data.blend=[{prefix: a, weight: 1}]", "model=qwen2_7b"]
    )  # fmt: skip
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.train.global_batch_size) == (2, 2, 512)
    assert cfg.optim.lr == 1e-5 and cfg.data.blend[0]["prefix"] == "a"
    assert cfg.model.arch().hidden_size == 3584
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="parallel.tp=two"):
        compose(["parallel.tp=two"])
    with pytest.raises(ConfigCompositionException, match="tensor_parallel"):
        compose(["parallel.tensor_parallel=2"])


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["train.precision=fp64"], "train.precision='fp64'"),
        (["optim.decay_style=exp"], "optim.decay_style='exp'"),
        (["optim.min_lr=1", "optim.lr=1e-5"], "optim.min_lr=1"),
        (["parallel.vpp=2"], "parallel.vpp=2 needs pipeline parallelism"),
        (["parallel.recompute_granularity=full"], "recompute_method"),
        (["train.global_batch_size=6", "train.micro_batch_size=4"], "not divisible"),
        (["logging.wandb.mode=cloud"], "logging.wandb.mode='cloud'"),
        (["train.exit_signals=[SIGFOO]"], "SIGFOO"),
        (["data.prefix=a", "data.blend=[{prefix: b, weight: 1}]"], "both set"),
    ],
)
def test_bad_single_values_fail_in_the_schema(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose(overrides)


def _plan(overrides, world=4):
    from sfmed.recipes.pretrain import PretrainRecipe
    from sfmed.train.plan import make_plan

    cfg = compose(["device=cpu", *overrides])
    return make_plan(cfg, PretrainRecipe(cfg), world_size=world)


def test_plan_resolves_sizes(corpus, tmp_path):
    plan = _plan(
        [f"data.prefix={corpus}", "parallel=tp2pp2", "train.global_batch_size=8",
         "train.micro_batch_size=2", f"ckpt_dir={tmp_path / 'run'}"],
        world=8,
    )  # fmt: skip
    assert (plan.dp, plan.num_microbatches) == (2, 2)
    assert plan.precision == "fp32" and plan.impl == "local" and plan.attention == "sdpa"
    assert plan.padded_vocab_size == 1024 and plan.resume_from is None


@pytest.mark.parametrize(
    "overrides,world,match",
    [
        # TP not dividing the heads (tiny: 8 heads, 2 query groups; valid: 1, 2, 4, 8)
        (["parallel.tp=3"], 3, r"parallel.tp=3 does not divide.*valid tp.*\[1, 2, 4, 8\]"),
        (
            ["model.num_query_groups=4", "parallel.tp=16"],
            16,
            r"parallel.tp=16 does not divide num_attention_heads=8",
        ),
        # global batch not divisible by micro-batch x DP
        (
            ["train.global_batch_size=6", "train.micro_batch_size=2"],
            2,
            r"micro_batch_size × data-parallel size = 2 × 2",
        ),
        # processes not a multiple of tp*pp
        (["parallel=tp2pp2"], 6, r"world size 6 is not divisible by parallel.tp\*pp\*cp"),
        (["parallel.pp=3"], 3, r"parallel.pp=3 does not divide num_layers=4"),
        (["parallel=tp2pp2", "parallel.vpp=4"], 4, r"pp\*vpp = 2\*4 does not divide num_layers=4"),
        (
            [
                "parallel=tp2pp2",
                "parallel.vpp=2",
                "train.global_batch_size=3",
                "train.micro_batch_size=1",
            ],
            4,
            r"multiple of parallel.pp=2",
        ),
        (["parallel.cp=2"], 2, r"parallel.cp=2 needs Transformer Engine"),
        (["train.precision=fp8"], 1, r"fp8 needs CUDA"),
        (["model.transformer_impl=transformer_engine"], 1, r"transformer_engine needs CUDA"),
        (["model.attention_backend=flash"], 1, r"flash"),
        (["optim.warmup_steps=2000", "train.steps=1000"], 1, r"optim.warmup_steps=2000"),
        (["train.eval_interval=10", "data.split='100,0,0'"], 1, r"no validation part"),
    ],
)
def test_impossible_layouts_fail_before_work(corpus, tmp_path, overrides, world, match):
    with pytest.raises(ConfigError, match=match):
        _plan([f"data.prefix={corpus}", f"ckpt_dir={tmp_path / 'r'}", *overrides], world=world)
    assert not (tmp_path / "r").exists()


def test_tp_larger_than_the_query_groups_plans(corpus, tmp_path):
    """tiny has 2 KV heads: megatron-core runs TP=4 (each rank all-gathers its group's QKV)."""
    plan = _plan(
        [f"data.prefix={corpus}", "parallel.tp=4", "train.global_batch_size=4",
         "train.micro_batch_size=1", f"ckpt_dir={tmp_path / 'run'}"],
        world=4,
    )  # fmt: skip
    assert (plan.dp, plan.num_microbatches) == (1, 4)


def test_missing_data_fails_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"no training data: set data.prefix="):
        _plan([f"ckpt_dir={tmp_path}/r"], world=1)
    with pytest.raises(ConfigError, match=r"nope_text_document.bin and .*\.idx not found"):
        _plan([f"data.prefix={tmp_path}/nope_text_document", f"ckpt_dir={tmp_path}/r"], world=1)
    with pytest.raises(ConfigError, match=r"without the extension"):
        _plan([f"data.prefix={tmp_path}/x.bin", f"ckpt_dir={tmp_path}/r"], world=1)
    with pytest.raises(ConfigError, match=r"data.blend: blend entry 0"):
        _plan([f"data.blend=[{{prefix: {tmp_path}/nope, weight: 1}}]", f"ckpt_dir={tmp_path}/r"], 1)


def _fake_checkpoint(root: Path, arch, tp=1, pp=1, it=10, extra=None) -> Path:
    d = root / layout.iter_dir_name(it)
    d.mkdir(parents=True)
    (d / "metadata.json").write_text("{}")
    layout.write_meta(
        d,
        {
            "arch": arch_to_dict(arch),
            "padded_vocab_size": 1024,
            "tp": tp,
            "pp": pp,
            **(extra or {}),
        },
    )
    layout.write_tracker(root, it)
    return d


def test_init_checkpoint_of_a_different_shape_fails(corpus, tmp_path):
    import dataclasses

    arch = compose([]).model.arch()
    _fake_checkpoint(tmp_path / "init", dataclasses.replace(arch, hidden_size=128, num_layers=2))
    with pytest.raises(
        ConfigError,
        match=r"different shape(.|\n)*num_layers: checkpoint 2 vs model 4(.|\n)*hidden_size: checkpoint 128 vs model 64",
    ):
        _plan(
            [f"data.prefix={corpus}", f"init_from={tmp_path / 'init'}", f"ckpt_dir={tmp_path}/r",
             "model=tiny"], 1
        )  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"init_from=.*does not exist(.|\n)*launch/convert.py to=mcore"
    ):
        _plan(
            [f"data.prefix={corpus}", f"init_from={tmp_path / 'none'}", f"ckpt_dir={tmp_path}/r"], 1
        )


def test_resume_rules(corpus, tmp_path):
    arch = compose([]).model.arch()
    run = tmp_path / "run"
    ckpt = _fake_checkpoint(
        run, arch, tp=2, pp=2, extra={"distrib_optim_sharding_type": "dp_reshardable"}
    )
    base = [f"data.prefix={corpus}", f"ckpt_dir={run}"]
    plan = _plan([*base, "parallel=tp2pp2"], world=4)
    assert plan.resume_from == ckpt and not plan.reshard
    with pytest.raises(ConfigError, match=r"resume=never but .* already holds checkpoints"):
        _plan([*base, "resume=never"], world=1)
    with pytest.raises(ConfigError, match=r"dp_reshardable(.|\n)*cannot be resumed at\s+tp=1 pp=1"):
        _plan(base, world=1)


def test_launch_refuses_a_bad_config_before_any_work(corpus, tmp_path):
    """The real entry point: exit code 2, the message names value and fix, nothing written."""
    run = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/pretrain.py"), "device=cpu", "parallel.tp=3",
         f"data.prefix={corpus}", f"ckpt_dir={run}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "parallel.tp=3 does not divide" in proc.stderr and "valid tp" in proc.stderr
    assert not run.exists()
    assert not (tmp_path / "outputs").exists()  # Hydra writes no per-run folders


def test_loss_guard_skips_spikes_and_stops_on_nan():
    from sfmed.train.guard import LossGuard

    g = LossGuard(nan_action="stop", spike_action="skip", factor=2.0, window=5, min_history=3,
                  max_consecutive_skips=2)  # fmt: skip
    for loss in (3.0, 2.9, 2.8):
        assert g.check(loss).action == "apply"
        g.accept(loss)
    v = g.check(9.0)
    assert v.action == "skip" and "spike" in v.reason
    assert g.check(9.0).action == "stop"  # the second skip in a row
    assert g.check(float("nan")).action == "stop"
    g2 = LossGuard(nan_action="skip", spike_action=None)
    g2.load_state_dict(g.state_dict())
    assert g2.check(float("inf")).action == "skip" and g2.check(100.0).action == "apply"
    assert g2.skipped_total == g.skipped_total + 1


def test_sampler_resumes_exactly_and_splits_over_dp():
    from sfmed.train.data import PretrainingSampler

    full = list(PretrainingSampler(48, 0, micro_batch_size=2, dp_rank=0, dp=1))
    resumed = list(PretrainingSampler(48, 16, micro_batch_size=2, dp_rank=0, dp=1))
    assert resumed == full[8:]
    r0 = list(PretrainingSampler(48, 16, micro_batch_size=2, dp_rank=0, dp=2))
    r1 = list(PretrainingSampler(48, 16, micro_batch_size=2, dp_rank=1, dp=2))
    assert sorted(i for b in r0 + r1 for i in b) == list(range(16, 48))
    assert r0[0] == [16, 17] and r1[0] == [18, 19]


def test_flops_and_mfu_formula():
    from sfmed.train.metrics import flops_per_token, matmul_params

    arch = compose(["model=qwen2_7b"]).model.arch()
    n = matmul_params(arch, 152064)
    # 7B: 28 layers x (3584 x (3584 + 2 x 512) + 3584^2 + 3 x 3584 x 18944) + 3584 x 152064
    assert n == 28 * (3584 * 4608 + 3584**2 + 3 * 3584 * 18944) + 3584 * 152064
    full, causal = flops_per_token(arch, 4096, 152064), flops_per_token(arch, 4096, 152064, True)
    assert full - causal == 6 * 28 * 4096 * 3584
    assert full == 6 * n + 12 * 28 * 4096 * 3584


def test_config_schema_json_roundtrip():
    from sfmed.train.trainer import config_to_dict

    d = config_to_dict(compose(["model=qwen2_1_5b"]))
    assert json.loads(json.dumps(d))["model"]["hidden_size"] == 1536


def test_slurm_scripts_parse_and_forward_overrides(tmp_path):
    """`submit.sh --dry-run` builds the sbatch call; the sbatch script is valid bash."""
    sbatch = REPO / "launch/slurm/pretrain.sbatch"
    assert subprocess.run(["bash", "-n", str(sbatch)]).returncode == 0
    proc = subprocess.run(
        [str(REPO / "launch/slurm/submit.sh"), "--nodes", "4", "--partition", "gpu", "--logs",
         str(tmp_path), "--dry-run", "--", "model=qwen2_7b", "run_name=cpt-7b"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[0] == "sbatch" and "--nodes=4" in cmd and "--gpus-per-node=8" in cmd
    assert "--partition=gpu" in cmd and "--job-name=sfmed-cpt-7b" in cmd
    assert cmd[-3:] == [str(sbatch), "model=qwen2_7b", "run_name=cpt-7b"]
    bad = subprocess.run(
        [str(REPO / "launch/slurm/submit.sh"), "--gpus-per-node", "0", "--dry-run"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "--nproc-per-node" in bad.stderr
