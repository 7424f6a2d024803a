"""The entry points: launch/convert.py, launch/verify.py (exit codes) and launch/quickstart.py,
plus their YAML validated against the schemas through Hydra's compose()."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, parse_result
from sfmed.core.errors import ConfigError


def _launch(script: str, *overrides, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / script), *map(str, overrides)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def _ok(proc: subprocess.CompletedProcess, rc: int = 0) -> str:
    assert proc.returncode == rc, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_yaml_matches_schema():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sfmed.config.convert import ConvertConfig, QuickstartConfig, VerifyConfig, register

    register()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        c = OmegaConf.to_object(
            compose("convert", ["to=mcore", "src=a", "dst=b", "parallel.tp=2", "parallel.pp=2"])
        )
        assert isinstance(c, ConvertConfig) and (c.parallel.tp, c.parallel.pp) == (2, 2)
        v = OmegaConf.to_object(compose("verify", ["hf=a", "mcore=b", "max_abs_diff=0.5"]))
        assert isinstance(v, VerifyConfig) and v.tolerances() == {"max_abs_diff": 0.5}
        q = OmegaConf.to_object(compose("quickstart"))
        assert isinstance(q, QuickstartConfig) and (q.tp, q.pp) == (2, 2)
        for name, overrides, match in [
            ("convert", ["src=a", "dst=b"], r"to=None: give to=mcore"),
            ("convert", ["to=hf", "src=a"], r"dst is required"),
            ("convert", ["to=hf", "src=a", "dst=b", "dtype=int8"], r"dtype='int8'"),
            ("convert", ["to=hf", "src=a", "dst=b", "max_shard_size=lots"], r"max_shard_size"),
            ("convert", ["to=mcore", "src=a", "dst=b", "parallel.tp=0"], r"parallel.tp=0"),
            ("verify", ["hf=a"], r"mcore is required"),
        ]:
            with pytest.raises(ConfigError, match=match):
                OmegaConf.to_object(compose(name, overrides))


def test_convert_entry_point(tiny_qwen2_factory, tmp_path):
    hf = tiny_qwen2_factory()
    ck, back = tmp_path / "ck", tmp_path / "back"
    out = _ok(
        _launch(
            "convert.py", "to=mcore", f"src={hf}", f"dst={ck}", "parallel.tp=2", "parallel.pp=2"
        )
    )
    assert "hf->mcore: 51 tensors" in out and "4 data files" in out
    out = _ok(_launch("convert.py", "to=hf", f"src={ck}", f"dst={back}"))
    assert "mcore->hf: 51 tensors" in out and (back / "model.safetensors").is_file()
    proc = _launch("convert.py", "to=hf", f"src={ck}", f"dst={back}")
    _ok(proc, rc=2)
    assert "exists and is not empty" in proc.stderr and "overwrite=true" in proc.stderr


@pytest.mark.dist
def test_verify_exit_codes(tiny_qwen2_factory, tmp_path):
    from sfmed.convert import convert_hf_to_mcore

    hf = tiny_qwen2_factory()
    other = tiny_qwen2_factory(seed=7)  # same shapes, different weights
    ck = tmp_path / "ck"
    convert_hf_to_mcore(hf, ck, progress=False)
    out = _ok(_launch("verify.py", f"hf={hf}", f"mcore={ck}", "device=cpu"))
    res = parse_result(out)
    assert res["passed"] and res["max_abs_diff"] <= 1e-4 and res["top1_agreement"] == 1.0
    assert "PASS: max|dlogit|=" in out
    out = _ok(_launch("verify.py", f"hf={other}", f"mcore={ck}", "device=cpu"), rc=1)
    res = parse_result(out)
    assert not res["passed"] and res["max_abs_diff"] > 1e-2 and "FAIL" in out
    proc = _launch("verify.py", f"hf={tmp_path / 'nope'}", f"mcore={ck}", "device=cpu")
    _ok(proc, rc=2)
    assert "no config.json" in proc.stderr


@pytest.mark.dist
def test_quickstart(tmp_path):
    """The README's main job: tiny model -> TP=2xPP=2 -> megatron-core logits -> back, exact."""
    work = tmp_path / "qs"
    out = _ok(_launch("quickstart.py", f"workdir={work}", "device=cpu"))
    assert out.rstrip().endswith("PASSED") and "[FAIL]" not in out
    assert "bit-exact" in out and "tp=2 pp=2" in out
    assert (work / "mcore-tp2pp2" / "latest_checkpointed_iteration.txt").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = _launch("quickstart.py", f"workdir={foreign}")
    _ok(proc, rc=2)
    assert "was not made by the quickstart" in proc.stderr
    assert (foreign / "notes.txt").read_text() == "mine"
