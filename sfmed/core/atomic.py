"""Atomic outputs: write under a temporary name, rename when complete.

A crash or Ctrl-C therefore never leaves something that looks finished: readers only ever see
the final name once everything under it is written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sfmed.core.errors import UserError


class OutputExistsError(UserError, FileExistsError):
    """The destination exists and is not empty, and overwriting was not asked for."""


def check_destination(dst: str | Path, overwrite: bool) -> None:
    """Refuse a non-empty ``dst`` unless ``overwrite``; call before any work starts."""
    p = Path(dst)
    if p.exists() and (p.is_file() or any(p.iterdir())) and not overwrite:
        raise OutputExistsError(
            f"destination {p} exists and is not empty; choose another path or pass overwrite=true"
        )


@contextlib.contextmanager
def atomic_dir(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``dst``; on success it replaces ``dst``.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and ``dst``
    is left as it was.
    """
    dst = Path(dst)
    check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    # mkdtemp makes 0700 folders; give the final output the mode a plain mkdir would.
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open()`` would give a new file
    (``mkstemp`` creates 0600 files, unreadable for the rest of a team sharing the outputs)."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_file(dst: str | Path, mode: str = "w", **open_kw):
    """Open a temporary sibling of ``dst`` for writing; fsync and rename onto ``dst`` on success."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    os.fchmod(fd, default_file_mode())
    os.close(fd)
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(dst: str | Path, text: str) -> None:
    """Write ``text`` to ``dst`` atomically (UTF-8)."""
    with atomic_file(dst, "w", encoding="utf-8") as f:
        f.write(text)
