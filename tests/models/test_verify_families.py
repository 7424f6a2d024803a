"""``launch/verify.py`` and ``launch/convert.py`` work for the families transformers has a class
for (the HF side is the family's class, the megatron side one process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import family_cases
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

family_factory = family_cases.family_factory  # the session fixture


@pytest.mark.parametrize("case", ["qwen3", "llama_gqa"])
def test_convert_and_verify_cli(family_factory, tmp_path, case):
    hf = family_factory(case)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    ck = tmp_path / "mcore"
    conv = subprocess.run(
        [sys.executable, str(REPO / "launch/convert.py"), "to=mcore", f"src={hf}", f"dst={ck}"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert conv.returncode == 0, conv.stderr[-4000:]
    ver = subprocess.run(
        [sys.executable, str(REPO / "launch/verify.py"), f"hf={hf}", f"mcore={ck}",
         "device=cpu", "dtype=float32"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert ver.returncode == 0, ver.stdout[-2000:] + ver.stderr[-4000:]
    res = _result(ver.stdout)
    assert res["passed"] and res["max_abs_diff"] <= 1e-4, res


def _result(stdout: str) -> dict:
    import json

    return json.loads(
        next(line for line in stdout.splitlines()[::-1] if line.startswith("RESULT "))[7:]
    )
