"""Logging set-up for every entry point, and the one place that silences known noise.

:func:`setup_logging` configures the root logger once per process (rank 0 at the requested
level, other ranks at ERROR: what they would warn about, rank 0 says once) and :func:`quiet_third_party` filters warnings that say nothing
to a user of sfmed: megatron-core announcing that the optional Transformer Engine / Apex
kernels are absent (sfmed's local spec does not use them), and deprecation notices raised inside
megatron-core, torch and transformers about their own internals (e.g. torch's renamed
collectives that megatron-core calls every step).
"""

from __future__ import annotations

import logging
import warnings

_FORMAT = "%(asctime)s {rank}%(levelname)s %(name)s: %(message)s"

# Loggers of libraries that are chatty at INFO.
_NOISY_LOGGERS = ("megatron", "torch.distributed", "matplotlib", "wandb", "httpx")

# (category, message regex, module regex) of warnings filtered everywhere.
_IGNORED_WARNINGS = (
    (UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\."),
    (UserWarning, r"Apex is not installed", r"megatron\."),
    (DeprecationWarning, r"", r"megatron\."),
    (FutureWarning, r"", r"megatron\."),
    (UserWarning, r"full scope is deprecated", r"megatron\."),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated", r""),
    # torch.distributed.checkpoint's own ShardedTensor notice, raised while megatron-core builds
    # its sharded state dicts (attributed to whatever frame calls it).
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor", r""),
    # torch's renaming of the collectives megatron-core's distributed optimizer calls every step
    # (attributed to torch's c10d logger wrapper): once per step and rank otherwise.
    (
        FutureWarning,
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        r"",
    ),
)


def quiet_third_party() -> None:
    """Install the warning filters for known third-party noise (idempotent)."""
    for category, message, module in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def setup_logging(level: int | str = logging.INFO, rank: int = 0) -> None:
    """Log to stderr: rank 0 at ``level``, other ranks at ERROR; noisy libraries at WARNING.

    ``level`` is a logging level or its name (``"INFO"``). Replaces earlier handlers, so calling
    it again (e.g. after torchrun sets the rank) is safe.
    """
    if isinstance(level, str):
        name = level.upper()
        if name not in logging.getLevelNamesMapping():
            from sfmed.core.errors import ConfigError

            raise ConfigError(f"logging level {level!r}: use DEBUG, INFO, WARNING or ERROR")
        level = logging.getLevelNamesMapping()[name]
    # Every rank runs the same code, so a warning on rank k is (nearly always) rank 0's warning
    # again: N copies per run. Rank-specific trouble is an error or a crash, and those show.
    effective = level if rank == 0 else max(level, logging.ERROR)
    tag = f"[rank{rank}] " if rank else ""
    logging.basicConfig(level=effective, format=_FORMAT.format(rank=tag), force=True)
    for noisy in _NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, effective))
    logging.captureWarnings(False)
    quiet_third_party()
