"""The architecture of a decoder-only checkpoint, independent of HF or megatron naming.

:class:`ModelArch` is what every stage passes around (conversion, training, verification); its
``family`` names the :class:`~sfmed.models.family.ModelFamily` that reads and writes it. This
module imports neither torch nor megatron.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from sfmed.core.errors import ConfigError


@dataclass(frozen=True)
class ModelArch:
    """Architecture facts of a GPT-style checkpoint (megatron-core's vocabulary of options).

    The defaults of the layer-spec facts (``qkv_bias``...) are those of the default family,
    Qwen2; other families set them from their ``config.json``.
    """

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
    family: str = "qwen2"
    """Registry key of the model family (the HF ``model_type``)."""
    qkv_bias: bool = True
    """Biases on the q/k/v projections (megatron's ``add_qkv_bias``)."""
    linear_bias: bool = False
    """Biases on every other linear layer (megatron's ``add_bias_linear``)."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (megatron's ``qk_layernorm``)."""
    position_embedding_type: str = "rope"
    """``rope`` (rotary, ``rope_theta``) or ``alibi`` (additive per-head linear bias in sfmed's
    SDPA core attention, no position embedding)."""
    norm_head: bool = False
    """The output layer L2-normalises each vocabulary row at run time (Baichuan2's NormHead)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def gqa(self) -> bool:
        """Grouped-query attention (fewer key/value heads than query heads)."""
        return self.num_query_groups != self.num_attention_heads


_FIELDS = tuple(f for f in ModelArch.__dataclass_fields__ if f != "extra")
_OPTIONAL = (
    "torch_dtype",
    "family",
    "qkv_bias",
    "linear_bias",
    "qk_layernorm",
    "position_embedding_type",
    "norm_head",
)


def arch_to_dict(arch: ModelArch) -> dict:
    """JSON-able form (stored in checkpoint metadata)."""
    d = asdict(arch)
    d.pop("extra", None)
    return d


def arch_from_dict(d: dict) -> ModelArch:
    """Inverse of :func:`arch_to_dict` (unknown keys, e.g. from newer versions, are ignored).

    Metadata written before families existed has no ``family``: it is a Qwen2 checkpoint, and
    the layer-spec facts it lacks are that family's.
    """
    from sfmed.models.family import get_family

    missing = sorted(set(_FIELDS) - set(d) - set(_OPTIONAL))
    if missing:
        raise ConfigError(
            f"checkpoint metadata 'arch' lacks {missing}; it was not written by sfmed"
        )
    family = get_family(d.get("family") or "qwen2")
    given = {k: v for k, v in d.items() if k in _FIELDS}
    values = {**family.arch_defaults_for(given), **given}
    values["family"] = family.model_type
    return ModelArch(**values)


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
