"""LLaMA / LLaMA-2 (and LLaMA-shaped checkpoints: Chinese-LLaMA, Ziya, 70B-style GQA).

Pre-norm RMSNorm decoder, SwiGLU MLP, RoPE (θ 10000 in the releases), no biases, MHA or GQA,
untied output layer in the releases. The SentencePiece ``tokenizer.model`` travels with the
checkpoint like every other non-weight file. The only module in sfmed that names LLaMA's
transformers classes; :class:`LlamaFamily` is also the base of other LLaMA-shaped families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from sfmed.core.errors import ConfigError
from sfmed.models.arch import ModelArch
from sfmed.models.families import common
from sfmed.models.family import ModelFamily, register_family


class LlamaFamily(ModelFamily):
    """LLaMA's facts (see the module docstring)."""

    model_type = "llama"
    hf_architecture = "LlamaForCausalLM"
    eod_token = "</s>"
    chat_format = "llama2"
    arch_defaults: ClassVar[dict[str, Any]] = {
        "qkv_bias": False,
        "linear_bias": False,
        "qk_layernorm": False,
    }
    display_name: ClassVar[str] = "LLaMA"
    default_rope_theta: ClassVar[float] = 10000.0
    default_eps: ClassVar[float] = 1e-6

    def check_biases(self, cfg: dict, heads: int = 0, kv: int = 0) -> None:
        """LLaMA releases have no biases; megatron-core cannot put them on q/k/v/o only."""
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ConfigError(
                f"attention_bias={cfg.get('attention_bias')!r} / mlp_bias="
                f"{cfg.get('mlp_bias')!r}: sfmed's {self.display_name} mapping has no biases "
                "(megatron-core cannot bias q/k/v/o without the MLP); set both to false"
            )

    def arch_from_hf(self, cfg: dict) -> ModelArch:
        """``config.json`` -> :class:`ModelArch` (refuses what the mapping cannot hold)."""
        return common.read_arch(
            cfg,
            family=self.model_type,
            name=self.display_name,
            arch_defaults=self.arch_defaults,
            max_positions=cfg.get("max_position_embeddings", 2048),
            rope_theta_default=self.default_rope_theta,
            eps_default=self.default_eps,
            check=self.check_biases,
        )

    def hf_config_class(self):
        """``transformers.LlamaConfig``."""
        from transformers import LlamaConfig

        return LlamaConfig

    def hf_model_class(self):
        """``transformers.LlamaForCausalLM``."""
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM

    def hf_config_kwargs(self, arch: ModelArch) -> dict[str, Any]:
        """Arguments of :meth:`hf_config_class` describing ``arch``."""
        return {
            **common.hf_arch_kwargs(arch),
            "head_dim": arch.kv_channels,
            "attention_bias": False,
            "mlp_bias": False,
        }

    def hf_config_dict(self, arch: ModelArch, dtype: str | None = None) -> dict:
        """A config (as ``config.json`` dict) describing ``arch``."""
        return common.hf_config_dict(self, self.hf_config_kwargs(arch), arch, dtype)

    def mapping(self, arch: ModelArch):
        """LLaMA's tensor table (megatron local/TE spec names <- HF names)."""
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
        **kw,
    ):
        """A config of a tiny model of this family (defaults: 4 layers, hidden 64, GQA 8/2)."""
        from sfmed.models.arch import ModelArch as _A

        arch = _A(
            num_layers=num_layers,
            hidden_size=hidden_size,
            ffn_hidden_size=intermediate_size,
            num_attention_heads=num_heads,
            num_query_groups=num_kv_heads,
            vocab_size=vocab_size,
            max_position_embeddings=max_position_embeddings,
            rms_norm_eps=self.default_eps,
            rope_theta=kw.pop("rope_theta", self.default_rope_theta),
            tie_word_embeddings=tie_word_embeddings,
            kv_channels=kw.pop("head_dim", hidden_size // num_heads),
            family=self.model_type,
            **self.arch_defaults,
        )
        args = {**self.hf_config_kwargs(arch), "bos_token_id": 1, "eos_token_id": 2, **kw}
        return self.hf_config_class()(**args)

    def make_tiny(self, out_dir, *, seed=0, dtype=None, max_shard_size=None, **config_kw) -> Path:
        """Write a tiny random model of this family (safetensors + config) to ``out_dir``."""
        return common.make_tiny_hf(
            self, out_dir, seed=seed, dtype=dtype, max_shard_size=max_shard_size, **config_kw
        )


LLAMA = register_family(LlamaFamily())
