"""Tiny random Qwen2 models written with ``transformers``: test fixtures and the built-in demo.

Nothing is downloaded: the model is created from a config with random weights, and norms and
biases are randomised too so that a swapped or misplaced tensor changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_qwen2_config(
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    vocab_size: int = 1000,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 256,
    rope_theta: float = 1_000_000.0,
):
    """A ``transformers.Qwen2Config`` of a tiny model (defaults: 4 layers, hidden 64, GQA 8/2)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
        use_sliding_window=False,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=vocab_size - 1,
    )


def make_tiny_qwen2(
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **config_kw,
) -> Path:
    """Write a tiny random ``Qwen2ForCausalLM`` (safetensors + config) to ``out_dir``."""
    from transformers import GenerationConfig, Qwen2ForCausalLM

    cfg = tiny_qwen2_config(**config_kw)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                # larger than the default init so that logits differ clearly between positions
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    model = model.to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kw)
    GenerationConfig(eos_token_id=cfg.eos_token_id, do_sample=False).save_pretrained(out)
    return out
