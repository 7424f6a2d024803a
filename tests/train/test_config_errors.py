"""A config error under torchrun: validated before torch/megatron-core is imported, every
problem reported at once, printed once, every rank exits 2 without a traceback of its own."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from sfmed.config.pretrain import PretrainConfig
from sfmed.config.validate import validate_run_config
from sfmed.core.errors import ConfigErrors


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from sfmed.config.pretrain import register

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="pretrain", overrides=overrides)


def test_every_problem_of_every_group_is_reported_together():
    cfg = _compose(["model=tiny", "parallel.tp=3", "optim.lr=-1", "train.steps=0"])
    with pytest.raises(ConfigErrors) as e:
        validate_run_config(cfg, PretrainConfig, world_size=2)
    got = e.value.problems
    assert len(got) == 4, got
    assert got[0].startswith("optim.lr=-1.0") and got[1].startswith("train.steps=0")
    assert "world size 2 is not divisible by parallel.tp*pp*cp = 3*1*1" in got[2]
    assert "parallel.tp=3 does not divide num_attention_heads=8" in got[3]
    assert str(e.value).startswith("4 problems:\n  - optim.lr")
    # The world-size checks on a valid config: batch divisibility and warmup together.
    cfg = _compose(["model=tiny", "train.global_batch_size=6", "train.micro_batch_size=2",
                    "train.steps=10", "optim.warmup_steps=10"])  # fmt: skip
    with pytest.raises(ConfigErrors) as e:
        validate_run_config(cfg, PretrainConfig, world_size=2)
    assert [p.split(" ")[0] for p in e.value.problems] == [
        "train.global_batch_size=6",
        "optim.warmup_steps=10",
    ]
    # A model taken from a checkpoint is not checked against the preset's heads here.
    cfg = _compose(["parallel.tp=3", "init_from=ckpt/some-7b"])
    ok = validate_run_config(cfg, PretrainConfig, world_size=3)
    assert ok.parallel.tp == 3 and ok.model.from_checkpoint
    with pytest.raises(ConfigErrors, match="parallel.tp=3 does not divide"):  # no checkpoint
        validate_run_config(_compose(["parallel.tp=3"]), PretrainConfig, world_size=3)


def test_validation_imports_neither_torch_nor_megatron():
    code = (
        "import sys\n"
        "from test_config_errors import _compose\n"
        "from sfmed.config.pretrain import PretrainConfig\n"
        "from sfmed.config.validate import validate_run_config\n"
        "validate_run_config(_compose(['model=tiny']), PretrainConfig, world_size=1)\n"
        "import sfmed.train.entry\n"
        "print(sorted(m for m in ('torch', 'megatron', 'transformers') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                       os.path.dirname(__file__)])}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.dist
def test_bad_parallel_tp_under_torchrun_is_reported_fast_once_exit_2(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={port}", str(REPO / "launch/pretrain.py"),
        "device=cpu", "model=tiny", "parallel.tp=3", "optim.lr=-1", f"ckpt_dir={tmp_path}/r",
        f"data.prefix={tmp_path}/none",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=env)  # fmt: skip
    lines, reported_after = [], None
    for line in proc.stdout:
        lines.append(line)
        if reported_after is None and line.startswith("pretrain: error:"):
            reported_after = time.monotonic() - start
    proc.wait(timeout=120)
    out = "".join(lines)
    assert proc.returncode != 0 and reported_after is not None, out
    print(f"config error reported {reported_after:.1f} s after the start of torchrun")
    assert out.count("pretrain: error:") == 1, out  # rank 0 only
    assert "3 problems" in out and "optim.lr=-1.0" in out and "parallel.tp=3 does not divide" in out
    # Every rank exited 2 by itself (torchrun's summary), none printed a traceback.
    codes = {pid: code for code, pid in re.findall(r"exitcode\s+:\s+(-?\d+) \(pid: (\d+)\)", out)}
    assert sorted(codes.values()) == ["2", "2"], out
    assert "sfmed" not in "".join(line for line in lines if line.lstrip().startswith("File "))
    assert "megatron" not in out.lower().replace("megatron-core", "")
    assert not (tmp_path / "r").exists()
    # Worker start-up plus validation, without megatron-core: seconds, not the 35-45 s it took.
    assert reported_after < 30, reported_after
