"""The one exit path of every entry point for errors the user can fix.

``run_cli("pretrain", fn, *args)`` calls ``fn``; a :class:`~sfmed.core.errors.UserError` is
printed once (by global rank 0, or by the single process outside torchrun) as
``<prog>: error: <message>`` and the process exits 2 on every rank, without a traceback.
Ctrl-C outside a trainer (which handles it itself) exits 130 with one line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from sfmed.core.errors import UserError


def is_rank0() -> bool:
    """True on global rank 0 under torchrun/Slurm, and in a plain process."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return os.environ[var] == "0"
    return True


def report_user_error(prog: str, err: BaseException) -> None:
    """Print ``err`` once (rank 0 only) in the entry points' format."""
    if is_rank0():
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)


def run_cli(prog: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)``; user errors exit 2 with one message, Ctrl-C exits 130."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        report_user_error(prog, e)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        if is_rank0():
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
