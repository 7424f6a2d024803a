"""Exit signals (Ctrl-C twice, data-loader workers that ignore the trainer's signals) and the
run-folder lock, in-process; the torchrun runs in test_pretrain_cpu.py use them for real."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from sfmed.train.lifecycle import RunLock, RunLockedError
from sfmed.train.loop import ExitSignals


def test_first_signal_is_recorded_second_ctrl_c_stops_at_once():
    old = signal.getsignal(signal.SIGINT)
    sigs = ExitSignals(["SIGTERM", "SIGUSR1", "SIGINT"])
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert sigs.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is old  # handlers put back
    finally:
        sigs.restore()
    sigs = ExitSignals(["SIGTERM", "SIGINT"])
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM still saves first
        assert sigs.received == "SIGTERM"
    finally:
        sigs.restore()


class _Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 10**6

    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.tensor([i])


def test_dataloader_workers_survive_the_signal_sent_to_the_process_group():
    """torchrun signals each rank's whole process group: the workers must not die of it."""
    from functools import partial

    from sfmed.train.data import _worker_init

    loader = torch.utils.data.DataLoader(
        _Slow(), batch_size=2, num_workers=2, persistent_workers=True,
        worker_init_fn=partial(_worker_init, ["SIGTERM", "SIGUSR1"]),
    )  # fmt: skip
    it = iter(loader)
    next(it)
    workers = [w.pid for w in it._workers]
    for pid in workers:  # what killpg does to them
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGUSR1)
    time.sleep(0.5)
    for _ in range(5):
        assert next(it).numel() == 2  # still serving batches
    del it, loader


HOLD = """
import sys, time
from sfmed.train.lifecycle import RunLock
RunLock(sys.argv[1]).acquire()
print("HELD", flush=True)
time.sleep(600)
"""


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE,
                              text=True, env=env)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(RunLockedError) as e:
            RunLock(run).acquire()
        msg = str(e.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and str(run) in msg
    finally:
        holder.kill()
        holder.wait()
    # The holder died (SIGKILL) without releasing: its lock file remains, naming it.
    assert json.loads((run / "run.lock").read_text())["pid"] == holder.pid
    lock = RunLock(run)
    lock.acquire()  # the kernel dropped the dead holder's lock: taken over
    assert json.loads((run / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (run / "run.lock").read_text() == ""
    again = RunLock(run)
    again.acquire()
    again.release()


def test_metrics_of_a_resumed_run_hold_each_step_once(tmp_path):
    """A resume truncates metrics.jsonl to its checkpoint; the steps after it are logged again."""
    from sfmed.train.metrics import MetricsSink

    run = tmp_path / "run"
    first = MetricsSink(run, enabled=True)
    for step in range(1, 8):
        first.log({"step": step, "loss": float(step)})
    first.log({"step": 5, "valid_loss": 1.0})  # a validation record of step 5
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # cut by the crash
    first.close()
    resumed = MetricsSink(run, enabled=True, resume_step=5)  # the checkpoint was step 5
    for step in range(6, 9):
        resumed.log({"step": step, "loss": 10.0 + step})
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in records if "loss" in r]
    assert train == list(range(1, 9))
    assert [r["loss"] for r in records if r["step"] == 7 and "loss" in r] == [17.0]
    assert sum(1 for r in records if "valid_loss" in r) == 1
