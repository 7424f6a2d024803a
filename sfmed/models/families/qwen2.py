"""Qwen2 (and Qwen1.5 / Qwen2.5, which share ``model_type: qwen2``).

Pre-norm RMSNorm decoder, SwiGLU MLP, RoPE, grouped-query attention with biases on q/k/v only,
optionally tied embeddings. The only module in sfmed that names Qwen2's transformers classes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from sfmed.core.errors import ConfigError
from sfmed.models.arch import ModelArch
from sfmed.models.families import common
from sfmed.models.family import ModelFamily, register_family

# HF tensor names.
HF_EMBED = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"
# HF buffers that older checkpoints carry but that are derived, not learned.
HF_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _attn(name: str) -> str:
    return "model.layers.{i}.self_attn." + name


def _mlp(name: str) -> str:
    return "model.layers.{i}.mlp." + name


class Qwen2Family(ModelFamily):
    """Qwen2's facts (see the module docstring)."""

    model_type = "qwen2"
    hf_architecture = "Qwen2ForCausalLM"
    eod_token = "<|endoftext|>"
    chat_format = "chatml"
    arch_defaults = {"qkv_bias": True, "linear_bias": False, "qk_layernorm": False}

    def arch_from_hf(self, cfg: dict) -> ModelArch:
        """Qwen2 ``config.json`` -> :class:`ModelArch` (refuses what the mapping cannot hold)."""
        common.check_fields(cfg, "Qwen2")
        common.check_full_attention(cfg)
        common.check_rope_scaling(cfg, "Qwen2")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(
                f"hidden_act={cfg['hidden_act']!r}: Qwen2 mapping expects 'silu' (SwiGLU)"
            )
        heads, kv, head_dim = common.attention_shape(cfg)
        # Qwen2's modeling code has biases on q/k/v and nowhere else; a config that says
        # otherwise is not a Qwen2 transformers would load the same way.
        if cfg.get("attention_bias") is False or cfg.get("mlp_bias"):
            raise ConfigError(
                "Qwen2 has biases on q/k/v only; this config.json sets attention_bias="
                f"{cfg.get('attention_bias')!r} / mlp_bias={cfg.get('mlp_bias')!r}, which the "
                "mapping cannot represent"
            )
        return ModelArch(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            ffn_hidden_size=int(cfg["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=kv,
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=common.rope_theta(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            kv_channels=head_dim,
            torch_dtype=common.config_dtype(cfg),
            family=self.model_type,
            **self.arch_defaults,
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = self.hf_config_class()(
                vocab_size=arch.vocab_size,
                hidden_size=arch.hidden_size,
                intermediate_size=arch.ffn_hidden_size,
                num_hidden_layers=arch.num_layers,
                num_attention_heads=arch.num_attention_heads,
                num_key_value_heads=arch.num_query_groups,
                max_position_embeddings=arch.max_position_embeddings,
                rms_norm_eps=arch.rms_norm_eps,
                rope_theta=arch.rope_theta,
                tie_word_embeddings=arch.tie_word_embeddings,
                use_sliding_window=False,
                hidden_act="silu",
            )
        d = cfg.to_dict()
        d["architectures"] = [self.hf_architecture]
        d["torch_dtype" if "torch_dtype" in d else "dtype"] = dtype or arch.torch_dtype
        if arch.kv_channels != arch.hidden_size // arch.num_attention_heads:
            d["head_dim"] = arch.kv_channels
        return d

    def mapping(self, arch: ModelArch):
        """Qwen2's tensor table (megatron local/TE spec names <- HF names)."""
        from sfmed.models import mapping as mp

        layer = (
            mp.Replicated(mp.QKV_NORM, ("model.layers.{i}.input_layernorm.weight",), ("hidden",)),
            mp.QKV(
                mp.QKV_W, (_attn("q_proj.weight"), _attn("k_proj.weight"), _attn("v_proj.weight"))
            ),
            mp.QKV(
                mp.QKV_B,
                (_attn("q_proj.bias"), _attn("k_proj.bias"), _attn("v_proj.bias")),
                bias=True,
            ),
            mp.SplitCols(mp.PROJ_W, (_attn("o_proj.weight"),), ("hidden", "q")),
            mp.Replicated(
                mp.FC1_NORM, ("model.layers.{i}.post_attention_layernorm.weight",), ("hidden",)
            ),
            mp.GateUp(mp.FC1_W, (_mlp("gate_proj.weight"), _mlp("up_proj.weight"))),
            mp.SplitCols(mp.FC2_W, (_mlp("down_proj.weight"),), ("hidden", "ffn")),
        )
        post = [mp.Replicated(mp.FINAL_NORM, (HF_FINAL_NORM,), ("hidden",))]
        if not arch.tie_word_embeddings:
            post.append(mp.Vocab(mp.OUTPUT, (HF_LM_HEAD,)))
        return mp.ModelMapping(
            pre=(mp.Vocab(mp.EMBED, (HF_EMBED,)),),
            layer=layer,
            post=tuple(post),
            tied=(HF_LM_HEAD, HF_EMBED) if arch.tie_word_embeddings else None,
            ignored_hf_suffixes=HF_IGNORED_SUFFIXES,
        )

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
        from sfmed.utils.tiny import randomise_and_save

        cfg = self.tiny_hf_config(**config_kw)
        return randomise_and_save(
            self.hf_model_class(),
            cfg,
            out_dir,
            seed=seed,
            dtype=dtype,
            max_shard_size=max_shard_size,
        )


QWEN2 = register_family(Qwen2Family())
