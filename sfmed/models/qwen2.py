"""Qwen2: HF ``config.json`` ⇄ megatron-core ``TransformerConfig`` + GPTModel arguments.

The one place that knows how a Qwen2 architecture is expressed in megatron-core. Conversion,
verification and training all build their GPTModel through :func:`build_model`.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sfmed.core.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen2",)
_REQUIRED_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


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
    missing = [k for k in _REQUIRED_FIELDS if cfg.get(k) is None]
    if missing:
        raise ConfigError(f"config.json lacks required field(s) {missing} for a Qwen2 model")
    for k in (*_REQUIRED_FIELDS, "num_key_value_heads", "head_dim", "max_position_embeddings"):
        v = cfg.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"config.json: {k}={v!r} must be a positive integer")
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
    if cfg.get("attention_bias") is False or cfg.get("mlp_bias"):
        raise ConfigError(
            "Qwen2 has biases on q/k/v only; this config.json sets attention_bias="
            f"{cfg.get('attention_bias')!r} / mlp_bias={cfg.get('mlp_bias')!r}, which the mapping "
            "cannot represent"
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


VOCAB_PAD_TP = 8
"""Converted checkpoints pad the vocabulary as Megatron would at TP = lcm(tp, 8), so one checkpoint
loads at every TP up to 8 with 128-aligned vocabulary slices (see :func:`checkpoint_vocab_size`)."""


def checkpoint_vocab_size(
    vocab_size: int, tp: int = 1, divisible_by: int = 128, pad_for_tp: int = VOCAB_PAD_TP
) -> int:
    """The padded vocabulary a converted checkpoint stores (and records in ``sfmed.json``).

    Megatron's own rule (:func:`padded_vocab_size`) depends on the TP size, so a checkpoint padded
    at TP=1 would not load at TP=2. Padding for ``lcm(tp, pad_for_tp)`` instead gives the same
    size for every TP up to ``pad_for_tp``; loaders read the stored size back rather than
    recomputing it. ``pad_for_tp=1`` reproduces Megatron-LM's ``--make-vocab-size-divisible-by``.
    """
    if divisible_by < 1 or pad_for_tp < 1:
        raise ConfigError(
            f"make_vocab_size_divisible_by={divisible_by} and vocab_pad_tp={pad_for_tp} must be "
            ">= 1"
        )
    return padded_vocab_size(vocab_size, math.lcm(tp, pad_for_tp), divisible_by)


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
    if arch.ffn_hidden_size % tp:
        raise ConfigError(
            f"parallel.tp={tp} does not divide intermediate_size (ffn)={arch.ffn_hidden_size}; "
            f"valid tp: {[d for d in divisors(arch.ffn_hidden_size) if d <= 64]}"
        )
    if layers_per_stage is not None:
        layers_per_stage = list(layers_per_stage)
        if len(layers_per_stage) != pp or sum(layers_per_stage) != arch.num_layers:
            raise ConfigError(
                f"layers_per_stage={layers_per_stage} must have parallel.pp={pp} entries summing "
                f"to num_layers={arch.num_layers}"
            )
        if any(n < 1 for n in layers_per_stage):
            raise ConfigError(f"layers_per_stage={layers_per_stage}: every stage needs >= 1 layer")
        if len(set(layers_per_stage[1:-1])) > 1:
            raise ConfigError(
                f"layers_per_stage={layers_per_stage}: megatron-core sets the first and last stage "
                "freely, but the middle stages must hold equal numbers of layers"
            )
    elif pp > arch.num_layers:
        raise ConfigError(
            f"parallel.pp={pp} exceeds num_layers={arch.num_layers}; valid pp: "
            f"{divisors(arch.num_layers)}"
        )
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
    padded_vocab_size: int | None = None,
):
    """Build the megatron-core GPTModel (this rank's stage) for ``arch``.

    ``padded_vocab_size`` (e.g. a checkpoint's ``sfmed.json`` value, see
    ``sfmed.convert.checkpoint_arch``) fixes the embedding rows; without it Megatron's rule
    :func:`padded_vocab_size` at this TP size is used.
    """
    from megatron.core.models.gpt import GPTModel

    config = config if config is not None else transformer_config(arch, tp=tp)
    tp_size = config.tensor_model_parallel_size
    if padded_vocab_size is None:
        vocab = _megatron_padded_vocab(arch.vocab_size, tp_size, make_vocab_size_divisible_by)
    else:
        vocab = int(padded_vocab_size)
        if vocab < arch.vocab_size or vocab % tp_size:
            raise ConfigError(
                f"padded_vocab_size={vocab} must be >= vocab_size={arch.vocab_size} and divisible "
                f"by tp={tp_size}"
            )
    return GPTModel(
        config=config,
        transformer_layer_spec=spec if spec is not None else layer_spec(arch),
        vocab_size=vocab,
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


_megatron_padded_vocab = padded_vocab_size  # build_model's keyword shadows the function name


def arch_to_dict(arch: Qwen2Arch) -> dict:
    """JSON-able form (stored in checkpoint metadata)."""
    d = asdict(arch)
    d.pop("extra", None)
    return d


def arch_from_dict(d: dict) -> Qwen2Arch:
    """Inverse of :func:`arch_to_dict` (unknown keys, e.g. from newer versions, are ignored)."""
    names = {f for f in Qwen2Arch.__dataclass_fields__ if f != "extra"}
    missing = sorted(names - set(d) - {"torch_dtype"})
    if missing:
        raise ConfigError(
            f"checkpoint metadata 'arch' lacks {missing}; it was not written by sfmed"
        )
    return Qwen2Arch(**{k: v for k, v in d.items() if k in names})


def hf_config_dict(arch: Qwen2Arch, dtype: str | None = None) -> dict:
    """A transformers ``Qwen2Config`` (as ``config.json`` dict) describing ``arch``.

    Used on the way back to HF when a checkpoint carries no HF ``config.json`` of its own.
    """
    from transformers import Qwen2Config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = Qwen2Config(
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
    d["architectures"] = ["Qwen2ForCausalLM"]
    d["torch_dtype" if "torch_dtype" in d else "dtype"] = dtype or arch.torch_dtype
    if arch.kv_channels != arch.hidden_size // arch.num_attention_heads:
        d["head_dim"] = arch.kv_channels
    return d
