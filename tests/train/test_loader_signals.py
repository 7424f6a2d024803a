"""Data-loader workers survive an exit signal sent while they start.

torchrun signals each rank's whole process group. A worker is forked with torch's own SIGTERM
handler (it dies unless its parent sent the signal) and ignores the exit signals only once
``worker_init_fn`` has run; a SIGTERM in between killed it, and the rank failed instead of
saving its checkpoint (each validation pass starts new workers, so this hit real runs). Here a
thread signals the process group every half millisecond while loaders start their workers, the
way a preemption lands at an arbitrary moment: torch's plain DataLoader loses a worker,
``SignalSafeLoader`` does not, and the process itself still receives every signal.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = """
import os, signal, sys, threading, time
from functools import partial
import torch
from sfmed.train.data import SignalSafeLoader, _worker_init

got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
stop = threading.Event()

def pelt():
    while not stop.is_set():
        os.killpg(0, signal.SIGTERM)
        time.sleep(0.0005)

threading.Thread(target=pelt, daemon=True).start()
for _ in range(20):
    kw = dict(batch_size=2, num_workers=2, worker_init_fn=partial(_worker_init, ["SIGTERM"]))
    if sys.argv[1] == "safe":
        dl = SignalSafeLoader(list(range(8)), exit_signals=["SIGTERM"], **kw)
    else:
        dl = torch.utils.data.DataLoader(list(range(8)), **kw)
    assert sum(len(b) for b in dl) == 8
stop.set()
print("signals received:", len(got))
"""


def _run(mode: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300,
        env=env, start_new_session=True,  # its own process group: the signals stay inside
    )  # fmt: skip


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method and process groups")
def test_workers_started_during_a_signal_storm_survive():
    plain = _run("plain")
    assert plain.returncode != 0 and "DataLoader worker" in plain.stderr, plain.stderr[-2000:]
    safe = _run("safe")
    assert safe.returncode == 0, safe.stderr[-3000:]
    assert int(safe.stdout.split(":")[1]) > 0  # the process itself got the signals
