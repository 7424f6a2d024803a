"""LLaMA / LLaMA-2 (and LLaMA-shaped checkpoints: Chinese-LLaMA, Ziya, 70B-style GQA).

Pre-norm RMSNorm decoder, SwiGLU MLP, RoPE (θ 10000 in the releases), no biases, MHA or GQA,
untied output layer in the releases. The SentencePiece ``tokenizer.model`` travels with the
checkpoint like every other non-weight file. The only module in sfmed that names LLaMA's
transformers classes; :class:`LlamaFamily` is also the base of other LLaMA-shaped families.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar

from sfmed.core.errors import ConfigError
from sfmed.models.arch import ModelArch
from sfmed.models.families import common
from sfmed.models.family import ModelFamily, register_family

HF_EMBED = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"
HF_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _attn(name: str) -> str:
    return "model.layers.{i}.self_attn." + name


def _mlp(name: str) -> str:
    return "model.layers.{i}.mlp." + name


def llama_layout_mapping(arch: ModelArch, *, qk_norm: bool = False):
    """The tensor table of LLaMA-layout checkpoints (``model.layers.{i}.self_attn.q_proj`` ...):
    q/k/v biases when ``arch.qkv_bias``, per-head q/k RMSNorm weights when ``qk_norm``."""
    from sfmed.models import mapping as mp

    layer = [
        mp.Replicated(mp.QKV_NORM, ("model.layers.{i}.input_layernorm.weight",), ("hidden",)),
        mp.QKV(mp.QKV_W, (_attn("q_proj.weight"), _attn("k_proj.weight"), _attn("v_proj.weight"))),
    ]
    if arch.qkv_bias:
        layer.append(
            mp.QKV(
                mp.QKV_B,
                (_attn("q_proj.bias"), _attn("k_proj.bias"), _attn("v_proj.bias")),
                bias=True,
            )
        )
    if qk_norm:
        # One RMSNorm weight per head dimension, shared by all heads: every TP rank holds it.
        layer += [
            mp.Replicated(mp.Q_NORM, (_attn("q_norm.weight"),), ("head_dim",)),
            mp.Replicated(mp.K_NORM, (_attn("k_norm.weight"),), ("head_dim",)),
        ]
    layer += [
        mp.SplitCols(mp.PROJ_W, (_attn("o_proj.weight"),), ("hidden", "q")),
        mp.Replicated(
            mp.FC1_NORM, ("model.layers.{i}.post_attention_layernorm.weight",), ("hidden",)
        ),
        mp.GateUp(mp.FC1_W, (_mlp("gate_proj.weight"), _mlp("up_proj.weight"))),
        mp.SplitCols(mp.FC2_W, (_mlp("down_proj.weight"),), ("hidden", "ffn")),
    ]
    post = [mp.Replicated(mp.FINAL_NORM, (HF_FINAL_NORM,), ("hidden",))]
    if not arch.tie_word_embeddings:
        post.append(mp.Vocab(mp.OUTPUT, (HF_LM_HEAD,)))
    return mp.ModelMapping(
        pre=(mp.Vocab(mp.EMBED, (HF_EMBED,)),),
        layer=tuple(layer),
        post=tuple(post),
        tied=(HF_LM_HEAD, HF_EMBED) if arch.tie_word_embeddings else None,
        ignored_hf_suffixes=HF_IGNORED_SUFFIXES,
    )


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

    def check_biases(self, cfg: dict) -> None:
        """LLaMA releases have no biases; megatron-core cannot put them on q/k/v/o only."""
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ConfigError(
                f"attention_bias={cfg.get('attention_bias')!r} / mlp_bias="
                f"{cfg.get('mlp_bias')!r}: sfmed's {self.display_name} mapping has no biases "
                "(megatron-core cannot bias q/k/v/o without the MLP); set both to false"
            )

    def arch_from_hf(self, cfg: dict) -> ModelArch:
        """``config.json`` -> :class:`ModelArch` (refuses what the mapping cannot hold)."""
        name = self.display_name
        common.check_fields(cfg, name)
        common.check_full_attention(cfg)
        common.check_rope_scaling(cfg, name)
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(
                f"hidden_act={cfg['hidden_act']!r}: the {name} mapping expects 'silu' (SwiGLU)"
            )
        self.check_biases(cfg)
        heads, kv, head_dim = common.attention_shape(cfg)
        theta = common.rope_theta(cfg) if _has_theta(cfg) else self.default_rope_theta
        return ModelArch(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            ffn_hidden_size=int(cfg["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=kv,
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", self.default_eps)),
            rope_theta=theta,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            kv_channels=head_dim,
            torch_dtype=common.config_dtype(cfg),
            family=self.model_type,
            **self.arch_defaults,
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
        return dict(
            vocab_size=arch.vocab_size,
            hidden_size=arch.hidden_size,
            intermediate_size=arch.ffn_hidden_size,
            num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_attention_heads,
            num_key_value_heads=arch.num_query_groups,
            head_dim=arch.kv_channels,
            max_position_embeddings=arch.max_position_embeddings,
            rms_norm_eps=arch.rms_norm_eps,
            rope_theta=arch.rope_theta,
            tie_word_embeddings=arch.tie_word_embeddings,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
        )

    def hf_config_dict(self, arch: ModelArch, dtype: str | None = None) -> dict:
        """A config (as ``config.json`` dict) describing ``arch``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = self.hf_config_class()(**self.hf_config_kwargs(arch))
        d = cfg.to_dict()
        d["architectures"] = [self.hf_architecture]
        d["torch_dtype" if "torch_dtype" in d else "dtype"] = dtype or arch.torch_dtype
        return d

    def mapping(self, arch: ModelArch):
        """LLaMA's tensor table (megatron local/TE spec names <- HF names)."""
        return llama_layout_mapping(arch)

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
        from sfmed.utils.tiny import randomise_and_save

        return randomise_and_save(
            self.hf_model_class(),
            self.tiny_hf_config(**config_kw),
            out_dir,
            seed=seed,
            dtype=dtype,
            max_shard_size=max_shard_size,
        )


def _has_theta(cfg: dict) -> bool:
    rp = cfg.get("rope_parameters")
    return "rope_theta" in cfg or (isinstance(rp, dict) and "rope_theta" in rp)


LLAMA = register_family(LlamaFamily())
