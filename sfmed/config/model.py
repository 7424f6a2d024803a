"""Schema of the ``model`` group (``conf/model/*.yaml``): an architecture + its implementation.

The architecture fields are those of :class:`sfmed.models.ModelArch` that a preset sets; the
family (HF ``model_type``) supplies the rest (biases, q/k norm). ``hf_config`` reads everything
from a Hugging Face ``config.json`` instead. Implementation choices (Transformer Engine or
megatron's local modules, attention kernel) live here too because they decide the layer spec.
This module does not import torch: :meth:`ModelConfig.arch` loads ``sfmed.models`` when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sfmed.core.errors import Problems

if TYPE_CHECKING:
    from sfmed.models import ModelArch

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "unfused")


@dataclass
class ModelConfig:
    """A decoder-only model (of a registered family) as megatron-core builds it."""

    name: str = "tiny"
    """Label only (logs, wandb, checkpoint metadata)."""

    from_checkpoint: bool = False
    """Take the architecture from the checkpoint the run starts from (``init_from``, or the
    run's own checkpoint on resume: its ``sfmed.json``, else its ``hf/config.json``); the fields
    below only apply when there is none. ``model=auto`` (the default) sets it."""

    family: str = "qwen2"
    """The model family (HF ``model_type``) of the fields below; ignored with ``hf_config``,
    whose ``model_type`` decides."""

    hf_config: str | None = None
    """An HF ``config.json`` (or the folder holding it): when set, the architecture fields below
    are read from it and the values given here are ignored."""

    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 8
    num_query_groups: int = 2
    """Key/value heads (``num_key_value_heads`` in HF): GQA when fewer than attention heads."""

    kv_channels: int | None = None
    """Head dimension; ``None`` = hidden_size / num_attention_heads."""

    vocab_size: int = 1000
    """The tokenizer's vocabulary (before Megatron's padding)."""

    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False

    position_embedding_type: str | None = None
    """``rope`` or ``alibi``; ``None``: the family decides (Baichuan: ALiBi for the 13B sizes)."""

    norm_head: bool | None = None
    """Normalise output-layer rows at run time; ``None``: the family decides (Baichuan2)."""

    make_vocab_size_divisible_by: int = 128
    """The vocabulary is padded to a multiple of this × lcm(TP, 8) (as the conversion does, so a
    checkpoint loads at every TP up to 8). An init/resume checkpoint's own ``padded_vocab_size``
    (sfmed.json) always wins, so the embedding keeps its shape."""

    transformer_impl: str = "auto"
    """``transformer_engine`` (TE layer spec: fused attention, FP8), ``local`` (megatron's own
    modules, no TE needed) or ``auto`` (TE when installed and running on CUDA)."""

    attention_backend: str = "auto"
    """Core attention of the local spec: ``sdpa`` (PyTorch scaled_dot_product_attention, flash /
    cuDNN / memory-efficient kernels on GPU), ``flash`` (the flash-attn package), ``unfused``
    (megatron's DotProductAttention, materialises the s×s scores) or ``auto`` (flash-attn when
    installed on CUDA, else sdpa). Ignored with Transformer Engine, which picks its own kernel."""

    def __post_init__(self):
        p = Problems()
        p.check(
            self.transformer_impl in TRANSFORMER_IMPLS,
            f"model.transformer_impl={self.transformer_impl!r} is not one of "
            f"{list(TRANSFORMER_IMPLS)}",
        )
        p.check(
            self.attention_backend in ATTENTION_BACKENDS,
            f"model.attention_backend={self.attention_backend!r} is not one of "
            f"{list(ATTENTION_BACKENDS)}",
        )
        bad = set()
        for k in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "vocab_size",
            "max_position_embeddings",
            "make_vocab_size_divisible_by",
        ):
            if not p.check(getattr(self, k) >= 1, f"model.{k}={getattr(self, k)} must be >= 1"):
                bad.add(k)
        # The shape's divisibility is checked only between sizes that are valid themselves.
        if self.hf_config is None:
            if not bad & {"num_attention_heads", "num_query_groups"}:
                p.check(
                    self.num_attention_heads % self.num_query_groups == 0,
                    f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                    f"model.num_query_groups={self.num_query_groups}",
                )
            if self.kv_channels is None and not bad & {"hidden_size", "num_attention_heads"}:
                p.check(
                    self.hidden_size % self.num_attention_heads == 0,
                    f"model.hidden_size={self.hidden_size} is not divisible by "
                    f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels",
                )
        p.raise_if_any()

    def arch(self) -> ModelArch:
        """The architecture these settings describe (from ``hf_config`` when given)."""
        from sfmed.models import arch_from_dict, arch_from_hf_config

        if self.hf_config:
            return arch_from_hf_config(self.hf_config)
        # The family fills what a preset does not say (biases, q/k norm), as for stored metadata.
        return arch_from_dict(
            {
                "family": self.family,
                "num_layers": self.num_layers,
                "hidden_size": self.hidden_size,
                "ffn_hidden_size": self.ffn_hidden_size,
                "num_attention_heads": self.num_attention_heads,
                "num_query_groups": self.num_query_groups,
                "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_position_embeddings,
                "rms_norm_eps": self.rms_norm_eps,
                "rope_theta": self.rope_theta,
                "tie_word_embeddings": self.tie_word_embeddings,
                "kv_channels": self.kv_channels or self.hidden_size // self.num_attention_heads,
                **{
                    k: getattr(self, k)
                    for k in ("position_embedding_type", "norm_head")
                    if getattr(self, k) is not None
                },
            }
        )
