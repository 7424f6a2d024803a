"""DPO configs: the YAML validates with DPO defaults, bad values fail in the schema (before any
work), the loss settings are the ones the loss module reads, and the schema stays torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from sfmed.config.dpo import DPOConfig, DPOLossConfig, register
from sfmed.core.errors import ConfigError

CONF = REPO / "conf"


def compose(overrides: list[str]) -> DPOConfig:
    """The typed config launch/dpo.py would get for ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="dpo", overrides=overrides)
    return OmegaConf.to_object(cfg)


def test_default_yaml_validates_with_dpo_defaults():
    cfg = compose([])
    assert isinstance(cfg, DPOConfig) and cfg.run_name == "dpo" and cfg.engine == "mcore"
    assert cfg.ckpt_dir == "runs/dpo"
    assert cfg.dpo == DPOLossConfig(loss_type="sigmoid", beta=0.1)
    assert cfg.reference.mode == "precompute" and cfg.reference.checkpoint is None
    assert cfg.data.prefix is None and cfg.data.split_weights == (100.0, 0.0, 0.0)
    assert not hasattr(cfg.data, "mask")  # preference masks are fixed: each side's answer
    assert cfg.optim.lr == pytest.approx(5e-7) and cfg.optim.weight_decay == 0.0
    hf = compose(["engine=hf", "hf.model=/m", "hf.lora.enabled=true", "dpo.loss_type=ipo"])
    assert hf.engine == "hf" and hf.hf.model == "/m" and hf.hf.lora.enabled
    assert hf.dpo.loss_type == "ipo" and hf.dpo.needs_token_counts
    ref = compose(["reference.mode=on_the_fly", "reference.checkpoint=/ckpt", "dpo.rpo_alpha=1"])
    assert ref.reference.mode == "on_the_fly" and ref.reference.checkpoint == "/ckpt"
    assert ref.dpo.rpo_alpha == 1.0


def test_loss_config_is_shared_with_the_loss_module():
    from sfmed.recipes import dpo_loss

    assert dpo_loss.DPOLossConfig is DPOLossConfig


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["dpo.loss_type=kto"], r"dpo.loss_type='kto' is not one of \['sigmoid', 'ipo'"),
        (["dpo.beta=0"], r"dpo.beta=0.0 must be a number > 0"),
        (["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"], r"no meaning for dpo.loss_type=ipo"),
        (["dpo.rpo_alpha=-1"], r"dpo.rpo_alpha=-1.0 must be >= 0"),
        (["reference.mode=lazy"], r"reference.mode='lazy' is not one of \['precompute'"),
        (["reference.checkpoint=''"], r"reference.checkpoint is empty"),
        (["engine=trl"], r"engine='trl' is not one of \['mcore', 'hf'\]"),
        (["data.seq_length=8"], r"data.seq_length=8 must be >= 16"),
        (["data.prefix=x", "data.blend=[{prefix: y}]"], r"data.prefix and data.blend are both"),
        (["data.split='0,1,0'"], r"data.split='0,1,0' must be"),
    ],
)
def test_bad_values_fail_in_the_schema(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose(overrides)


def test_schema_imports_no_torch():
    code = "import sys, sfmed.config.dpo; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
