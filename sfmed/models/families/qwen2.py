"""Qwen2 (and Qwen1.5 / Qwen2.5, which share ``model_type: qwen2``).

Pre-norm RMSNorm decoder, SwiGLU MLP, RoPE, grouped-query attention with biases on q/k/v only,
optionally tied embeddings. The only module in sfmed that names Qwen2's transformers classes.
"""

from __future__ import annotations

from pathlib import Path

from sfmed.core.errors import ConfigError
from sfmed.models.arch import ModelArch
from sfmed.models.families import common
from sfmed.models.families.common import HF_EMBED, HF_FINAL_NORM, HF_LM_HEAD  # noqa: F401
from sfmed.models.family import ModelFamily, register_family


class Qwen2Family(ModelFamily):
    """Qwen2's facts (see the module docstring)."""

    model_type = "qwen2"
    hf_architecture = "Qwen2ForCausalLM"
    eod_token = "<|endoftext|>"
    chat_format = "chatml"
    arch_defaults = {"qkv_bias": True, "linear_bias": False, "qk_layernorm": False}

    def arch_from_hf(self, cfg: dict) -> ModelArch:
        """Qwen2 ``config.json`` -> :class:`ModelArch` (refuses what the mapping cannot hold)."""
        return common.read_arch(
            cfg,
            family=self.model_type,
            name="Qwen2",
            arch_defaults=self.arch_defaults,
            max_positions=cfg.get("max_position_embeddings", 32768),
            check=_check_biases,
        )

    def hf_config_class(self):
        """``transformers.Qwen2Config``."""
        from transformers import Qwen2Config

        return Qwen2Config

    def hf_model_class(self):
        """``transformers.Qwen2ForCausalLM``."""
        from transformers import Qwen2ForCausalLM

        return Qwen2ForCausalLM

    def hf_config_dict(self, arch: ModelArch, dtype: str | None = None) -> dict:
        """A ``Qwen2Config`` (as ``config.json`` dict) describing ``arch``."""
        kwargs = {**common.hf_arch_kwargs(arch), "use_sliding_window": False}
        d = common.hf_config_dict(self, kwargs, arch, dtype)
        if arch.kv_channels != arch.hidden_size // arch.num_attention_heads:
            d["head_dim"] = arch.kv_channels
        return d

    def mapping(self, arch: ModelArch):
        """Qwen2's tensor table: the LLaMA layout with q/k/v biases (``arch.qkv_bias``)."""
        return common.llama_layout_mapping(arch)

    def tiny_hf_config(
        self,
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
        """A ``Qwen2Config`` of a tiny model (defaults: 4 layers, hidden 64, GQA 8/2)."""
        return self.hf_config_class()(
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

    def make_tiny(self, out_dir, *, seed=0, dtype=None, max_shard_size=None, **config_kw) -> Path:
        """Write a tiny random ``Qwen2ForCausalLM`` (safetensors + config) to ``out_dir``.

        Norms and biases are randomised too, so a swapped or misplaced tensor changes the logits.
        """
        return common.make_tiny_hf(
            self, out_dir, seed=seed, dtype=dtype, max_shard_size=max_shard_size, **config_kw
        )


def _check_biases(cfg: dict, heads: int, kv: int) -> None:
    # Qwen2's modeling code has biases on q/k/v and nowhere else; a config that says
    # otherwise is not a Qwen2 transformers would load the same way.
    if cfg.get("attention_bias") is False or cfg.get("mlp_bias"):
        raise ConfigError(
            "Qwen2 has biases on q/k/v only; this config.json sets attention_bias="
            f"{cfg.get('attention_bias')!r} / mlp_bias={cfg.get('mlp_bias')!r}, which the "
            "mapping cannot represent"
        )


QWEN2 = register_family(Qwen2Family())
