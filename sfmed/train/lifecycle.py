"""What keeps one run to one folder and one launcher: the run-folder lock and the parent watchdog.

- :class:`RunLock`: rank 0 holds an exclusive POSIX lock (``fcntl.lockf``, which NFS supports)
  on ``<run dir>/run.lock`` for the whole run, and writes its pid, host and start time into it.
  A second run on the folder is refused naming the holder. The kernel (or NFS lock manager)
  drops the lock when its holder dies, so the lock file of a dead run is taken over without
  asking anything of the user.
- :func:`start_parent_watchdog`: torchrun starts each rank in its own session, so killing the
  launcher's process group leaves the ranks training. A daemon thread notices that the rank was
  re-parented and ends the process.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from sfmed.core.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunLockedError(UserError):
    """Another live run holds the run folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder, held by one process (see the module docstring)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def _holder(self, fd: int) -> dict:
        # Read through the lock's own descriptor: closing any other descriptor of the file
        # would drop this process's POSIX lock.
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict) -> RunLockedError:
        who = (
            f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"(since {holder.get('started', '?')})"
        )
        return RunLockedError(
            f"{self.path.parent} is in use by another run: {who} holds {self.path}. Wait for it "
            "to finish or stop it (a killed run releases the lock by itself), or give this run "
            "another run_name / ckpt_dir"
        )

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError` naming its holder."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                holder = self._holder(fd)
                os.close(fd)
                raise self._refuse(holder) from None
            # No lock support on this file system: fall back to the pid the file names.
            holder = self._holder(fd)
            if holder.get("host") == socket.gethostname() and _pid_alive(int(holder.get("pid", 0))):
                os.close(fd)
                raise self._refuse(holder) from None
            log.warning(
                "%s: file locks are not supported here (%s); using the pid only", self.path, e
            )
        previous = self._holder(fd)
        if previous.get("pid"):
            log.info(
                "taking over the lock of a run that ended without releasing it (pid %s on %s)",
                previous.get("pid"),
                previous.get("host"),
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Empty the lock file and drop the lock (the file stays: unlinking it would let a run
        that opened it before lock a file no one else sees)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing the descriptor drops the POSIX lock
            self._fd = None


def start_parent_watchdog(interval: float = 1.0) -> threading.Thread | None:
    """End this process when its parent (the launcher) dies; no-op for a process whose parent is
    already init. Returns the daemon thread."""
    parent = os.getppid()
    if parent <= 1:
        return None

    def watch():
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                log.error("the launcher (pid %d) is gone: this rank exits", parent)
                logging.shutdown()
                os._exit(1)

    t = threading.Thread(target=watch, name="sfmed-parent-watchdog", daemon=True)
    t.start()
    return t
