"""The tiny model of each family case the family tests run on, and its reference logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from baichuan_reference import baichuan_logits

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
    # Qwen2.5-0.5B-shaped: tied embeddings, 14 heads / 2 KV heads scaled down to 8 / 2
    "qwen2_5_tied": dict(
        make=_tiny("qwen2", num_kv_heads=2, tie_word_embeddings=True), reference=transformers_logits
    ),
    # Qwen3: q/k RMSNorm, no biases, head_dim 16 != hidden / heads = 8, tied
    "qwen3": dict(make=_tiny("qwen3"), reference=transformers_logits),
    # LLaMA-2-7B-shaped (MHA) and 70B-shaped (GQA 8/2)
    "llama_mha": dict(make=_tiny("llama", num_kv_heads=8), reference=transformers_logits),
    "llama_gqa": dict(make=_tiny("llama", num_kv_heads=2), reference=transformers_logits),
    # Baichuan2-7B-shaped: W_pack, RoPE, NormHead
    "baichuan2_rope": dict(
        make=_tiny("baichuan", position_embedding_type="rope", norm_head=True),
        reference=lambda hf, tokens: baichuan_logits(hf, tokens),
    ),
    # Baichuan-13B-shaped: ALiBi over 12 heads (not a power of two: interleaved slopes), no
    # NormHead; TP=4 gives each rank 3 heads' slopes
    "baichuan_alibi": dict(
        make=_tiny(
            "baichuan",
            position_embedding_type="alibi",
            norm_head=False,
            num_heads=12,
            hidden_size=96,
        ),
        reference=lambda hf, tokens: baichuan_logits(hf, tokens),
        layouts=[(2, 2, 2, 2), (4, 1, 4, 1)],
    ),
}


@pytest.fixture(scope="session")
def family_factory(tmp_path_factory):
    """``make(case_name)`` -> the tiny HF folder of a case of :data:`FAMILY_CASES` (cached)."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            cache[name] = FAMILY_CASES[name]["make"](d / "hf")
        return cache[name]

    return make
