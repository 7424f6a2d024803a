"""RMSNorm for megatron-core's local spec that also works with sequence parallelism.

megatron's ``WrappedTorchNorm`` (the local spec's norm) asserts ``not config.sequence_parallel``,
and its other local norm, ``FusedLayerNorm``, needs apex. With sequence parallelism each TP rank
normalises a different slice of the sequence, so the norm weight's gradient is partial per rank:
megatron's ``finalize_model_grads`` all-reduces it over the TP group for every parameter marked
``sequence_parallel=True`` — exactly what TE's and apex's norms do. :class:`RMSNorm` is torch's
``RMSNorm`` with that mark (and the same state-dict name ``weight``, so checkpoints are unchanged).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built from a megatron config, safe under sequence parallelism."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-6,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("sfmed.models.norm.RMSNorm implements plain RMSNorm only")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        # finalize_model_grads all-reduces grads of params marked like this over the TP group.
        self.weight.sequence_parallel = bool(config.sequence_parallel)
