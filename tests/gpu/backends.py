"""The attention implementations present on this machine, as pytest parameters.

Each entry is ``(id, transformer_impl, attention_backend)``; an implementation whose package does
not import is still listed, skipped with the reason, so a GPU report shows what did not run.
"""

from __future__ import annotations

import pytest


def attention_backends() -> list:
    """pytest params over TE, flash-attn, PyTorch SDPA and megatron's unfused attention."""
    from sfmed.models.specs import flash_attn_status, te_available

    flash_ok, flash_why = flash_attn_status()
    te_ok = te_available()
    return [
        pytest.param(
            "transformer_engine", None, id="te",
            marks=pytest.mark.skipif(not te_ok, reason="Transformer Engine does not import"),
        ),
        pytest.param(
            "local", "flash", id="flash",
            marks=pytest.mark.skipif(not flash_ok, reason=flash_why),
        ),
        pytest.param("local", "sdpa", id="sdpa"),
        pytest.param("local", "unfused", id="unfused"),
    ]  # fmt: skip
