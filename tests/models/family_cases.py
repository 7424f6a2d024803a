"""The tiny model of each family case the family tests run on, and its reference logits."""

from __future__ import annotations

import torch

from sfmed.convert.verify import hf_logits
from sfmed.models import get_family


def transformers_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the family's transformers class."""
    return hf_logits(hf, tokens, torch.float32, "cpu")


def _tiny(family: str, **kw):
    return lambda out: get_family(family).make_tiny(out, seed=3, **kw)


FAMILY_CASES: dict[str, dict] = {
    # 8 heads, 2 KV heads: TP=4 exceeds the KV heads; also loaded at TP=4 from a TP=1 conversion
    "qwen2_gqa2": dict(
        make=_tiny("qwen2", num_kv_heads=2),
        reference=transformers_logits,
        layouts=[(2, 2, 2, 2), (4, 1, 4, 1), (1, 1, 4, 1)],
    ),
}
