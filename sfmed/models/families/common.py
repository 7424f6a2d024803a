"""``config.json`` readers shared by the Llama-shaped families (Qwen2, LLaMA, Qwen3...)."""

from __future__ import annotations

from sfmed.core.errors import ConfigError

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


def rope_theta(cfg: dict) -> float:
    """rope_theta lives top-level in transformers-4 configs, under rope_parameters in v5."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    return 10000.0


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
