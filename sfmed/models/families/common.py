"""What the Llama-shaped families (Qwen2, LLaMA, Qwen3, Baichuan) share: the ``config.json``
checks and reader (:func:`read_arch`), the LLaMA tensor layout (:func:`llama_layout_mapping`),
the export config and the tiny-model writer."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sfmed.core.errors import ConfigError
from sfmed.models.arch import ModelArch

# HF tensor names of the LLaMA layout.
HF_EMBED = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"
# HF buffers that older checkpoints carry but that are derived, not learned.
HF_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

REQUIRED_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


def check_fields(cfg: dict, family: str) -> None:
    """Required fields present, sizes positive integers."""
    missing = [k for k in REQUIRED_FIELDS if cfg.get(k) is None]
    if missing:
        raise ConfigError(f"config.json lacks required field(s) {missing} for a {family} model")
    for k in (*REQUIRED_FIELDS, "num_key_value_heads", "head_dim", "max_position_embeddings"):
        v = cfg.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"config.json: {k}={v!r} must be a positive integer")


def rope_theta(cfg: dict, default: float = 10000.0) -> float:
    """rope_theta lives top-level in transformers-4 configs, under rope_parameters in v5;
    ``default`` when the config has neither (the family's release value)."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    return default


def check_rope_scaling(cfg: dict, family: str) -> None:
    """Refuse RoPE scaling: megatron-core's GPTModel would silently compute other positions."""
    scaling = cfg.get("rope_scaling")
    rp = cfg.get("rope_parameters")
    rope_type = None
    if isinstance(rp, dict):
        rope_type = rp.get("rope_type", rp.get("type"))
    if isinstance(scaling, dict):
        rope_type = scaling.get("rope_type", scaling.get("type", rope_type))
    if rope_type not in (None, "default"):
        raise ConfigError(
            f"rope scaling type {rope_type!r} is not supported by sfmed's {family} mapping "
            "(megatron-core's GPTModel would silently compute different positions); "
            "remove rope_scaling / set rope_type='default' in config.json."
        )


def check_full_attention(cfg: dict) -> None:
    """Refuse sliding-window layers (not represented by megatron-core's GPTModel here)."""
    if cfg.get("use_sliding_window"):
        raise ConfigError(
            "use_sliding_window=true: sliding-window attention is not represented by megatron-core's "
            "GPTModel here; set use_sliding_window=false (Qwen2 releases ship it off)."
        )
    sliding = [i for i, t in enumerate(cfg.get("layer_types") or []) if t != "full_attention"]
    if sliding:
        raise ConfigError(
            f"layer_types marks layers {sliding[:8]} as {cfg['layer_types'][sliding[0]]!r}; "
            "only full attention is represented by megatron-core's GPTModel here. Set "
            "use_sliding_window=false and every layer_types entry to 'full_attention'."
        )


def attention_shape(cfg: dict) -> tuple[int, int, int]:
    """(heads, key/value heads, head_dim), checked for divisibility."""
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if hidden % heads and not cfg.get("head_dim"):
        raise ConfigError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    if heads % kv:
        raise ConfigError(
            f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv}"
        )
    return heads, kv, head_dim


def config_dtype(cfg: dict) -> str:
    """The stored dtype name (``torch_dtype`` in transformers 4, ``dtype`` in 5)."""
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return str(dtype).replace("torch.", "")


def read_arch(
    cfg: dict,
    *,
    family: str,
    name: str,
    arch_defaults: dict[str, Any],
    max_positions: int,
    rope_theta_default: float = 10000.0,
    eps_default: float = 1e-6,
    sliding_window_check: bool = True,
    check: Callable[[dict, int, int], None] | None = None,
    **extra: Any,
) -> ModelArch:
    """The :class:`ModelArch` of a Llama-shaped ``config.json``: required fields, no RoPE scaling,
    SwiGLU, full attention (unless ``sliding_window_check`` is off), then ``check(cfg, heads,
    kv_heads)`` for the family's own refusals. ``max_positions``: the config's positions (the
    family decides where to read them); ``extra``: further ModelArch fields (variant facts)."""
    check_fields(cfg, name)
    if sliding_window_check:
        check_full_attention(cfg)
    check_rope_scaling(cfg, name)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(
            f"hidden_act={cfg['hidden_act']!r}: the {name} mapping expects 'silu' (SwiGLU)"
        )
    heads, kv, head_dim = attention_shape(cfg)
    if check is not None:
        check(cfg, heads, kv)
    return ModelArch(
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=int(cfg["hidden_size"]),
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=kv,
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(max_positions),
        rms_norm_eps=float(cfg.get("rms_norm_eps", eps_default)),
        rope_theta=rope_theta(cfg, rope_theta_default),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        kv_channels=head_dim,
        torch_dtype=config_dtype(cfg),
        family=family,
        **arch_defaults,
        **extra,
    )


def _attn(name: str) -> str:
    return "model.layers.{i}.self_attn." + name


def _mlp(name: str) -> str:
    return "model.layers.{i}.mlp." + name


def llama_layout_mapping(
    arch: ModelArch,
    *,
    qk_norm: bool = False,
    packed_qkv: str | None = None,
    ignored_hf_suffixes: tuple[str, ...] = HF_IGNORED_SUFFIXES,
):
    """The tensor table of LLaMA-layout checkpoints (``model.layers.{i}.self_attn.q_proj`` ...):
    q/k/v biases when ``arch.qkv_bias``, per-head q/k RMSNorm weights when ``qk_norm``, one
    fused ``[q; k; v]`` tensor named ``packed_qkv`` instead of q/k/v_proj (Baichuan's W_pack)."""
    from sfmed.models import mapping as mp

    layer = [mp.Replicated(mp.QKV_NORM, ("model.layers.{i}.input_layernorm.weight",), ("hidden",))]
    if packed_qkv:
        layer.append(mp.PackedQKV(mp.QKV_W, (packed_qkv,)))
    else:
        layer.append(
            mp.QKV(
                mp.QKV_W, (_attn("q_proj.weight"), _attn("k_proj.weight"), _attn("v_proj.weight"))
            )
        )
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
        ignored_hf_suffixes=ignored_hf_suffixes,
    )


def hf_arch_kwargs(arch: ModelArch) -> dict[str, Any]:
    """The transformers config arguments every Llama-shaped family's config class shares."""
    return dict(
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
        hidden_act="silu",
    )


def hf_config_dict(family, kwargs: dict[str, Any], arch: ModelArch, dtype: str | None) -> dict:
    """``config.json`` dict of ``family.hf_config_class()(**kwargs)`` with the architecture name
    and the stored dtype (under the key this transformers version writes)."""
    with warnings.catch_warnings():
        # transformers warns about unused/renamed arguments it handles itself
        warnings.simplefilter("ignore")
        cfg = family.hf_config_class()(**kwargs)
    d = cfg.to_dict()
    d["architectures"] = [family.hf_architecture]
    d["torch_dtype" if "torch_dtype" in d else "dtype"] = dtype or arch.torch_dtype
    return d


def make_tiny_hf(family, out_dir, *, seed=0, dtype=None, max_shard_size=None, **config_kw) -> Path:
    """Write a tiny random model of a family with a transformers class (safetensors + config):
    ``family.tiny_hf_config(**config_kw)``, norms and biases randomised too."""
    from sfmed.utils.tiny import randomise_and_save

    return randomise_and_save(
        family.hf_model_class(),
        family.tiny_hf_config(**config_kw),
        out_dir,
        seed=seed,
        dtype=dtype,
        max_shard_size=max_shard_size,
    )
