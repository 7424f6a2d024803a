"""``launch/pipeline.py ... launcher=slurm`` on the real single-node Slurm (the fixture of
tests/train/test_slurm.py: only in CI or with SFMED_TEST_SLURM=1): one job per stage chained with
afterok, the training stage through launch/slurm/train.sbatch, and the summary job that records
every stage complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from train.test_slurm import slurm  # noqa: F401 (the fixture)

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.dist]

STAGES = "[assets,convert,prep_cpt,cpt]"


def _squeue(env) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T %E"], capture_output=True, text=True,
                         env=env).stdout  # fmt: skip
    return {line.split()[0]: line for line in out.splitlines() if line.strip()}


def test_tiny_chain_on_slurm(slurm, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    env = {
        **slurm, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    cmd = [sys.executable, str(REPO / "launch/pipeline.py"), "recipe=tiny_cpu", f"out_dir={out}",
           f"stages={STAGES}", "launcher=slurm", "slurm.gpus_per_node=0"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    man = json.loads((out / "pipeline.json").read_text())
    jobs = [man["stages"][s]["job_id"] for s in ("assets", "convert", "prep_cpt", "cpt")]
    assert all(man["stages"][s]["status"] == "submitted" for s in man["stages"])
    queued = _squeue(slurm)
    for prev, job in zip(jobs, jobs[1:], strict=False):
        assert f"submitted job {job} (after {prev})" in p.stdout
        if job in queued and "PENDING" in queued[job]:
            assert f"afterok:{prev}" in queued[job], queued[job]
    summary_job = p.stdout.split("[summary] submitted job ")[1].split(";")[0].split()[0]
    deadline = time.time() + 900
    while any(j in _squeue(slurm) for j in [*jobs, summary_job]):
        assert time.time() < deadline, sorted((out / "logs").glob("*.out"))
        time.sleep(2)
    logs = "\n".join(f.read_text() for f in sorted((out / "logs").glob("*.out")))
    man = json.loads((out / "pipeline.json").read_text())
    for s in ("assets", "convert", "prep_cpt", "cpt"):
        assert man["stages"][s]["status"] == "complete", (s, logs[-4000:])
    assert man["stages"]["cpt"]["result"]["step"] == 12
    assert "run status: complete" in logs  # the training stage went through train.sbatch
    assert (out / "summary.md").is_file() and (out / "loss_cpt.png").is_file()
    # running the command again finds nothing to submit but the summary
    again = subprocess.run([*cmd, "dry_run=true"], capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=300)  # fmt: skip
    assert again.returncode == 0
    assert sum("skip" in line for line in again.stdout.splitlines()) == 4, again.stdout
