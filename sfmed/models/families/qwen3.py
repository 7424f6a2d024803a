"""Qwen3 dense models (``model_type: qwen3``).

LLaMA's layout plus a per-head RMSNorm on queries and keys before RoPE (megatron-core's
``qk_layernorm``), no q/k/v biases, and an explicit ``head_dim`` that need not equal
hidden / heads (megatron-core's ``kv_channels``). The only module in sfmed that names Qwen3's
transformers classes.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sfmed.models.arch import ModelArch
from sfmed.models.families import common
from sfmed.models.families.llama import LlamaFamily
from sfmed.models.family import register_family


class Qwen3Family(LlamaFamily):
    """Qwen3's facts (see the module docstring)."""

    model_type = "qwen3"
    hf_architecture = "Qwen3ForCausalLM"
    eod_token = "<|endoftext|>"
    chat_format = "chatml"
    arch_defaults: ClassVar[dict[str, Any]] = {
        "qkv_bias": False,
        "linear_bias": False,
        "qk_layernorm": True,
    }
    display_name = "Qwen3"
    default_rope_theta = 1_000_000.0
    default_eps = 1e-6

    def hf_config_class(self):
        """``transformers.Qwen3Config``."""
        from transformers import Qwen3Config

        return Qwen3Config

    def hf_model_class(self):
        """``transformers.Qwen3ForCausalLM``."""
        from transformers import Qwen3ForCausalLM

        return Qwen3ForCausalLM

    def hf_config_kwargs(self, arch: ModelArch) -> dict[str, Any]:
        kw = super().hf_config_kwargs(arch)
        kw.pop("mlp_bias")
        return {**kw, "use_sliding_window": False}

    def mapping(self, arch: ModelArch):
        """Qwen3's tensor table: LLaMA's plus ``q_norm``/``k_norm`` (megatron q/k_layernorm)."""
        return common.llama_layout_mapping(arch, qk_norm=True)

    def tiny_hf_config(self, **kw):
        """A tiny Qwen3 (4 layers, hidden 64, GQA 8/2, head_dim 16 != hidden/heads, tied)."""
        kw.setdefault("head_dim", 16)
        kw.setdefault("tie_word_embeddings", True)
        return super().tiny_hf_config(**kw)


QWEN3 = register_family(Qwen3Family())
