"""Dtype names: the one table between the spellings users write and torch dtypes.

Configs spell floating-point dtypes as HF ``config.json`` does (``bfloat16``, ``float16``,
``float32``); training precisions use Megatron-LM's short forms (``bf16``, ``fp16``, ``fp32``).
Importing this module does not import torch, so config schemas can use the names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sfmed.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = ("bfloat16", "float16", "float32")
"""The compute/storage dtypes sfmed accepts by name."""

SHORT_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""Megatron-LM's precision spellings and the dtype each stands for."""


def torch_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """``torch.bfloat16`` for ``'bfloat16'``, ``'bf16'`` or ``'torch.bfloat16'``.

    Raises :class:`ConfigError` naming ``what`` and the valid names for anything else.
    """
    import torch

    key = str(name).removeprefix("torch.")
    key = SHORT_NAMES.get(key, key)
    if key not in FLOAT_DTYPES:
        raise ConfigError(
            f"{what}={name!r} is not a dtype sfmed computes in; use one of {list(FLOAT_DTYPES)}"
        )
    return getattr(torch, key)


def dtype_name(dtype: torch.dtype) -> str:
    """``'bfloat16'`` for ``torch.bfloat16`` (the spelling of HF configs)."""
    return str(dtype).removeprefix("torch.")
