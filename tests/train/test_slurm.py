"""launch/slurm/pretrain.sbatch (which runs the generic train.sbatch) on a real single-node Slurm
(slurmctld + slurmd + munge), and train.sbatch with stand-ins for ``srun``/``scontrol``.

The real-Slurm test runs only in CI (``CI=true``) or when asked (``SFMED_TEST_SLURM=1``): it
installs Debian's slurm-wlm and munge (apt-get, when missing, which needs root), writes a munge
key, and starts the daemons with a throwaway slurm.conf (this host as controller and only
node); elsewhere it skips saying so. The job trains a tiny CPU-emulated model; the test sends the job's steps SIGUSR1 (what
``--signal=USR1@300`` does before the time limit), and the run must save, requeue itself, resume
from its checkpoint and finish. Skips, with the reason, where the daemons cannot start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def _sh(cmd, timeout=60, env=None, check=False):
    return subprocess.run(
        cmd, shell=isinstance(cmd, str), capture_output=True, text=True, timeout=timeout,
        env=env, check=check,
    )  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


OPT_IN = "SFMED_TEST_SLURM"


def _opted_in() -> str | None:
    """None when this run may install packages and start daemons (CI, or asked), else why not.

    The test apt-installs slurm-wlm and munge, writes /etc/munge/munge.key and starts munged,
    slurmctld and slurmd: nothing a test run on a workstation should do unasked.
    """
    if os.environ.get("CI", "").lower() == "true" or os.environ.get(OPT_IN) == "1":
        return None
    return (
        "the real-Slurm test installs slurm-wlm/munge and starts munged/slurmctld/slurmd; it "
        f"runs only in CI (CI=true) or when asked ({OPT_IN}=1)"
    )


def _ensure_installed() -> str | None:
    """None when slurm + munge are usable, else why not."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0:
        return "slurm-wlm/munge are not installed and installing them needs root"
    if not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    inst = _sh("apt-get install -y -q slurm-wlm munge", timeout=600, env=env)
    if inst.returncode != 0:
        _sh("apt-get update -q", timeout=600, env=env)
        inst = _sh("apt-get install -y -q slurm-wlm munge", timeout=600, env=env)
    if inst.returncode != 0:
        return f"apt-get install slurm-wlm munge failed: {inst.stderr[-500:]}"
    return None


def _start_munge(started: list) -> str | None:
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    if _sh("munge -n | unmunge").returncode == 0:
        return None  # a munged is already serving
    r = _sh("su -s /bin/sh munge -c munged")
    if r.returncode != 0:
        return f"munged does not start: {r.stderr.strip()[-300:]}"
    pid = Path("/run/munge/munged.pid")
    if pid.is_file():
        started.append(int(pid.read_text().split()[0]))
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node Slurm; yields the environment that points its clients at it."""
    if sys.platform != "linux":
        pytest.skip("Slurm daemons need Linux")
    reason = _opted_in()
    if reason:
        pytest.skip(reason)
    reason = _ensure_installed()
    if reason:
        pytest.skip(reason)
    started: list[int] = []
    reason = _start_munge(started)
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool", "log"):
        (base / d).mkdir()
    host = socket.gethostname().split(".")[0]
    mem = int(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 * 0.9)
    conf = base / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=sfmedtest",
                f"SlurmctldHost={host}",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"SlurmctldPort={_port()}",
                f"SlurmdPort={_port()}",
                "AuthType=auth/munge",
                f"StateSaveLocation={base}/state",
                f"SlurmdSpoolDir={base}/spool",
                f"SlurmctldPidFile={base}/slurmctld.pid",
                f"SlurmdPidFile={base}/slurmd.pid",
                f"SlurmctldLogFile={base}/log/slurmctld.log",
                f"SlurmdLogFile={base}/log/slurmd.log",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "MpiDefault=none",
                f"NodeName={host} CPUs={os.cpu_count()} RealMemory={mem} State=UNKNOWN",
                f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            ]
        )  # fmt: skip
        + "\n"
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = []
    try:
        for daemon in ("slurmctld", "slurmd"):
            r = _sh([daemon, "-f", str(conf)], env=env)
            if r.returncode != 0:
                pytest.skip(f"{daemon} does not start: {r.stderr.strip()[-300:]}")
            daemons.append(base / f"{daemon}.pid")
            time.sleep(1)
        for _ in range(60):
            out = _sh(["sinfo", "-h", "-o", "%t"], env=env).stdout.strip()
            if out == "idle":
                break
            time.sleep(0.5)
        else:
            log = (base / "log" / "slurmctld.log").read_text()[-800:]
            pytest.skip(f"the Slurm node never became idle (sinfo: {out!r}); slurmctld log: {log}")
        yield env
    finally:
        for pidfile in daemons:
            if pidfile.is_file():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pidfile.read_text().split()[0]), 15)
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)


def _corpus(root: Path) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(root / "corpus_text_document")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for i in range(100):
        doc = np.concatenate([np.tile(np.arange(5 + i % 7, 17 + i % 7), 5), [999]])
        b.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    b.finalize(prefix + ".idx")
    return prefix


def _job_state(job: str, env) -> str:
    """The job's state, "" once it has left the queue.

    A loaded controller answers squeue with an error now and then ("Socket timed out"); that is
    not "the job is gone", so ask again rather than read an empty answer as finished.
    """
    for _ in range(30):
        r = _sh(["squeue", "-h", "-j", job, "-o", "%T"], env=env)
        if r.returncode == 0:
            return r.stdout.strip()
        if "Invalid job id" in r.stderr:
            return ""  # purged from the controller's memory: it has ended
        time.sleep(1)
    raise AssertionError(f"squeue keeps failing for job {job}: {r.stderr.strip()[-500:]}")


def _wait(pred, timeout, what, log: Path, env=None):
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            tail = log.read_text()[-3000:] if log.is_file() else "(no job log)"
            ctld = ""
            if env is not None:  # the controller's view says why a job did not (re)start
                ctld_log = Path(env["SLURM_CONF"]).parent / "log" / "slurmctld.log"
                ctld = "\nslurmctld log:\n" + ctld_log.read_text()[-3000:]
            raise AssertionError(f"timed out waiting for {what}; job log:\n{tail}{ctld}")
        time.sleep(0.5)


def test_sbatch_trains_checkpoints_requeues_and_resumes(slurm, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    env = {
        **slurm, "SFMED_PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    overrides = [
        "device=cpu", "parallel.pp=2", f"data.prefix={_corpus(tmp_path)}", "data.seq_length=32",
        "data.num_workers=0", "train.steps=30", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.save_interval=10", "optim.lr=3e-3",
        "optim.warmup_steps=2", f"ckpt_dir={run}", "run_name=slurm-smoke",
    ]  # fmt: skip
    sub = _sh(
        [str(REPO / "launch/slurm/submit.sh"), "--nodes", "1", "--gpus-per-node", "0",
         "--nproc-per-node", "2", "--time", "10", "--logs", str(logs), "--", *overrides],
        env=env,
    )  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    log = logs / f"sfmed-slurm-smoke-{job}.out"
    metrics = run / "metrics.jsonl"

    def steps_done() -> int:
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    try:
        _wait(lambda: steps_done() >= 3, 240, "the job to train 3 steps", log)
        # What Slurm's --signal=USR1@300 does before the time limit: USR1 to the job's steps.
        assert _sh(["scancel", "--signal=USR1", job], env=slurm).returncode == 0
        _wait(lambda: "requeueing job" in (log.read_text() if log.is_file() else ""), 240,
              "the job to save and requeue itself", log)  # fmt: skip
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "interrupted" and status["iteration"] < 30
        saved = int((run / "latest_checkpointed_iteration.txt").read_text())
        assert saved == status["iteration"]
        # A requeued job waits ~2 minutes (BeginTime); release it now.
        _wait(lambda: _job_state(job, slurm) == "PENDING", 60, "the requeued job", log, slurm)
        # Not at once: slurmd refuses a job whose credential is not newer than the revocation
        # the requeue made ("Killing non-startable batch job: Job credential revoked"); the
        # BeginTime delay exists for that. Credentials carry whole seconds: a few are enough.
        time.sleep(5)
        _sh(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm)
        # Done means the batch script's last line, not an empty squeue answer.
        _wait(lambda: "run status: complete" in log.read_text(), 400,
              "the resumed job to finish", log, slurm)  # fmt: skip
        _wait(lambda: _job_state(job, slurm) in ("", "COMPLETED"), 60, "the job to end", log, slurm)
    finally:
        if _job_state(job, slurm):
            _sh(["scancel", job], env=slurm)
    text = log.read_text()
    assert f"job {job} (restart 0) on 1 node(s) x 2 process(es)" in text  # SLURM_NNODES etc.
    assert "received SIGUSR1" in text and f"job {job} (restart 1)" in text
    assert f"resumed from {run}/iter_{saved:07d}" in text
    assert json.loads((run / "status.json").read_text())["status"] == "complete"
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 31))


def _small_run(tmp_path: Path, run: Path) -> list[str]:
    return [
        "device=cpu", f"data.prefix={_corpus(tmp_path)}", "data.seq_length=32",
        "data.num_workers=0", "train.steps=4", "train.global_batch_size=2",
        "train.micro_batch_size=1", "train.save_interval=2", "optim.warmup_steps=1",
        f"ckpt_dir={run}", "logging.level=WARNING",
    ]  # fmt: skip


_SRUN = """#!/bin/bash
# Stand-in for srun on one node: drop srun's options, run the command once.
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
_SCONTROL = """#!/bin/bash
# Stand-in for scontrol: the node list is this host; record everything else.
if [ "$1" = show ] && [ "$2" = hostnames ]; then echo 127.0.0.1; exit 0; fi
echo "scontrol $*" >> "$STUB_LOG"
"""


def _stub_env(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", _SRUN), ("scontrol", _SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {
        **os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STUB_LOG": str(tmp_path / "scontrol.log"), "SFMED_ROOT": str(REPO),
        "SFMED_PYTHON": sys.executable, "SFMED_NPROC_PER_NODE": "1",
        "SFMED_MASTER_PORT": str(_port()), "SLURM_JOB_ID": "77", "SLURM_NNODES": "1",
        "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost", "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip


def test_generic_sbatch_runs_the_entry_it_is_given(tmp_path):
    """train.sbatch (srun/scontrol stood in) runs launch/pretrain.py given as its argument, and
    pretrain.sbatch hands its overrides to train.sbatch with ENTRY=launch/pretrain.py."""
    env = _stub_env(tmp_path)
    run = tmp_path / "run"
    proc = _sh(
        ["bash", str(REPO / "launch/slurm/train.sbatch"), "launch/pretrain.py",
         *_small_run(tmp_path, run)],
        timeout=600, env=env,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "entry launch/pretrain.py" in out and "run status: complete" in out, out[-3000:]
    assert json.loads((run / "status.json").read_text())["status"] == "complete"
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert not (tmp_path / "scontrol.log").exists()  # complete: no requeue
    # The pretrain wrapper: an override that does not compose stops it before any srun.
    bad = _sh(
        ["bash", str(REPO / "launch/slurm/pretrain.sbatch"), "no_such_group_or_key=1"],
        timeout=300, env=env,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "do not compose into a config of launch/pretrain.py" in bad.stderr, bad.stderr
    missing = _sh(["bash", str(REPO / "launch/slurm/train.sbatch"), "launch/nope.py"], env=env)
    assert missing.returncode == 2 and "launch/nope.py not found" in missing.stderr


def test_submit_entry_selects_the_generic_script(tmp_path):
    """`submit.sh --entry X` submits train.sbatch with ENTRY=X; without it, pretrain.sbatch."""
    submit = str(REPO / "launch/slurm/submit.sh")
    proc = _sh(
        [submit, "--entry", "launch/pretrain.py", "--logs", str(tmp_path), "--dry-run", "--",
         "model=tiny"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[:2] == ["ENTRY=launch/pretrain.py", "sbatch"] and "--job-name=sfmed-pretrain" in cmd
    assert cmd[-2:] == [str(REPO / "launch/slurm/train.sbatch"), "model=tiny"]
    bad = _sh([submit, "--entry", "launch/nope.py", "--dry-run"])
    assert bad.returncode == 2 and "launch/nope.py is not a file" in bad.stderr


def test_real_slurm_runs_only_when_asked(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(OPT_IN, raising=False)
    assert "SFMED_TEST_SLURM=1" in _opted_in()
    monkeypatch.setenv("CI", "true")
    assert _opted_in() is None
    monkeypatch.delenv("CI")
    monkeypatch.setenv(OPT_IN, "1")
    assert _opted_in() is None
