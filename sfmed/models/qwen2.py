"""Qwen2: HF ``config.json`` ⇄ megatron-core ``TransformerConfig`` + GPTModel arguments.

The one place that knows how a Qwen2 architecture is expressed in megatron-core. Conversion,
verification and training all build their GPTModel through :func:`build_model`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("qwen2",)
_REQUIRED_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


class ConfigError(ValueError):
    """A model or parallel configuration the user supplied cannot be used."""


@dataclass(frozen=True)
class Qwen2Arch:
    """The architecture facts of a Qwen2 checkpoint, independent of HF or megatron naming."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    kv_channels: int
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def gqa(self) -> bool:
        return self.num_query_groups != self.num_attention_heads


def _rope_theta(cfg: dict) -> float:
    """rope_theta lives top-level in transformers-4 configs, under rope_parameters in v5."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    return 10000.0


def _check_rope_scaling(cfg: dict) -> None:
    scaling = cfg.get("rope_scaling")
    rp = cfg.get("rope_parameters")
    rope_type = None
    if isinstance(rp, dict):
        rope_type = rp.get("rope_type", rp.get("type"))
    if isinstance(scaling, dict):
        rope_type = scaling.get("rope_type", scaling.get("type", rope_type))
    if rope_type not in (None, "default"):
        raise ConfigError(
            f"rope scaling type {rope_type!r} is not supported by sfmed's Qwen2 mapping "
            "(megatron-core's GPTModel would silently compute different positions); "
            "remove rope_scaling / set rope_type='default' in config.json."
        )


def arch_from_hf_config(cfg: dict | str | Path) -> Qwen2Arch:
    """Read a Qwen2 ``config.json`` (dict or path to the file / its folder) into :class:`Qwen2Arch`.

    Refuses what megatron-core's GPTModel cannot represent exactly.
    """
    if not isinstance(cfg, dict):
        p = Path(cfg)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"no config.json at {p}; point to a Hugging Face Qwen2 model folder")
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from e
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type={mt!r} is not supported; sfmed converts {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    missing = [k for k in _REQUIRED_FIELDS if k not in cfg]
    if missing:
        raise ConfigError(f"config.json lacks required field(s) {missing} for a Qwen2 model")
    if cfg.get("use_sliding_window"):
        raise ConfigError(
            "use_sliding_window=true: sliding-window attention is not represented by megatron-core's "
            "GPTModel here; set use_sliding_window=false (Qwen2 releases ship it off)."
        )
    _check_rope_scaling(cfg)
    for k in ("hidden_act",):
        if cfg.get(k, "silu") != "silu":
            raise ConfigError(f"{k}={cfg[k]!r}: Qwen2 mapping expects 'silu' (SwiGLU)")
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
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return Qwen2Arch(
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=kv,
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        kv_channels=head_dim,
        torch_dtype=str(dtype).replace("torch.", ""),
    )


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = 128) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def validate_parallel(arch: Qwen2Arch, tp: int, pp: int, layers_per_stage: list[int] | None = None):
    """Raise :class:`ConfigError` naming the numbers when ``arch`` cannot be split TP×PP ways."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"parallel.tp={tp} and parallel.pp={pp} must both be >= 1")

    def divisors(n: int) -> list[int]:
        return [d for d in range(1, n + 1) if n % d == 0]

    for what, n in (
        ("num_attention_heads", arch.num_attention_heads),
        ("num_key_value_heads (query groups)", arch.num_query_groups),
    ):
        if n % tp:
            valid = [
                d for d in divisors(arch.num_query_groups) if arch.num_attention_heads % d == 0
            ]
            raise ConfigError(
                f"parallel.tp={tp} does not divide {what}={n}; valid tp for this model: {valid}"
            )
    if layers_per_stage is not None:
        if len(layers_per_stage) != pp or sum(layers_per_stage) != arch.num_layers:
            raise ConfigError(
                f"layers_per_stage={layers_per_stage} must have parallel.pp={pp} entries summing "
                f"to num_layers={arch.num_layers}"
            )
        if any(n < 1 for n in layers_per_stage):
            raise ConfigError(f"layers_per_stage={layers_per_stage}: every stage needs >= 1 layer")
    elif arch.num_layers % pp:
        raise ConfigError(
            f"parallel.pp={pp} does not divide num_layers={arch.num_layers}; valid pp: "
            f"{divisors(arch.num_layers)} (or give an uneven layout with layers_per_stage)"
        )


def transformer_config(
    arch: Qwen2Arch,
    tp: int = 1,
    pp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    layers_per_stage: list[int] | None = None,
    **overrides: Any,
):
    """megatron-core ``TransformerConfig`` for ``arch`` (training options go in ``overrides``)."""
    from megatron.core.transformer import TransformerConfig

    validate_parallel(arch, tp, pp, layers_per_stage)
    kw: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        layernorm_epsilon=arch.rms_norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=True,
    )
    if layers_per_stage is not None and pp > 1:
        kw["num_layers_in_first_pipeline_stage"] = layers_per_stage[0]
        kw["num_layers_in_last_pipeline_stage"] = layers_per_stage[-1]
    kw.update(overrides)
    return TransformerConfig(**kw)


def layer_spec(arch: Qwen2Arch, use_te: bool = False):
    """Layer spec: Transformer Engine's when asked for (and installed), else megatron's local one."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def build_model(
    arch: Qwen2Arch,
    config=None,
    *,
    tp: int = 1,
    pre_process: bool = True,
    post_process: bool = True,
    spec=None,
    vp_stage: int | None = None,
    max_sequence_length: int | None = None,
    make_vocab_size_divisible_by: int = 128,
):
    """Build the megatron-core GPTModel (this rank's stage) for ``arch``."""
    from megatron.core.models.gpt import GPTModel

    config = config if config is not None else transformer_config(arch, tp=tp)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec if spec is not None else layer_spec(arch),
        vocab_size=padded_vocab_size(
            arch.vocab_size, config.tensor_model_parallel_size, make_vocab_size_divisible_by
        ),
        max_sequence_length=max_sequence_length or arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,
        parallel_output=True,
        vp_stage=vp_stage,
    )


def arch_to_dict(arch: Qwen2Arch) -> dict:
    """JSON-able form (stored in checkpoint metadata)."""
    d = asdict(arch)
    d.pop("extra", None)
    return d
