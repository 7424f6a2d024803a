"""The one exit path of every entry point for errors the user can fix.

``run_cli("pretrain", fn, *args)`` calls ``fn``; a :class:`~sfmed.core.errors.UserError` is
printed once (by global rank 0, or by the single process outside torchrun) as
``<prog>: error: <message>`` and the process exits 2 on every rank, without a traceback.
Ctrl-C outside a trainer (which handles it itself) exits 130 with one line.
"""

from __future__ import annotations

import os
import signal
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


def under_torchrun() -> bool:
    """True in a process started by torchrun (torch.distributed.run)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def hold_sigterm(hold: bool = True) -> None:
    """Under torchrun, ignore SIGTERM while ``hold`` (default back otherwise).

    An entry point holds it from its first line until its config is validated: every rank
    validates the same config, and torchrun SIGTERMs the others as soon as one exits, so a rank
    still starting up would die of the signal instead of exiting 2 with the same error.
    """
    if under_torchrun():
        signal.signal(signal.SIGTERM, signal.SIG_IGN if hold else signal.SIG_DFL)


def report_user_error(prog: str, err: BaseException) -> None:
    """Print ``err`` once (rank 0 only) in the entry points' format."""
    if is_rank0():
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)


def run_cli(prog: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)``; user errors exit 2 with one message, Ctrl-C exits 130."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        # torchrun SIGTERMs the other ranks as soon as one exits: every rank is exiting with this
        # same error, so each finishes its own exit 2 instead of dying of the signal.
        hold_sigterm()
        report_user_error(prog, e)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        if is_rank0():
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
