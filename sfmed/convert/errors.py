"""Errors a user can cause when converting or loading checkpoints (reported before any output)."""

from __future__ import annotations


class ConversionError(Exception):
    """Base class: the input cannot be converted as asked; the message names value and fix."""


class HFCheckpointError(ConversionError):
    """A Hugging Face model folder is incomplete or inconsistent (shards, index, dtypes, shapes)."""


class CheckpointFormatError(ConversionError):
    """A Megatron checkpoint folder is incomplete or not in the torch_dist format."""


class CheckpointMismatchError(ConversionError):
    """A checkpoint does not fit the model it is loaded into (shapes, vocabulary, layers)."""
