"""Errors a user can cause when converting or loading checkpoints (reported before any output).

They live in :mod:`sfmed.core.errors` (loading a checkpoint is core); this module keeps the names
importable from the conversion package. ``ConversionError`` is their common base.
"""

from __future__ import annotations

from sfmed.core.errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    HFCheckpointError,
)

ConversionError = CheckpointError

__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "ConversionError",
    "HFCheckpointError",
]
