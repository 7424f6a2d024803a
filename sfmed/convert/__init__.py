"""Exact, streaming Hugging Face <-> Megatron (megatron-core torch_dist) conversion for every
registered model family (see :mod:`sfmed.models`).

Entry point: ``launch/convert.py``; library use::

    from sfmed.convert import convert_hf_to_mcore, convert_mcore_to_hf, load_mcore_weights
    convert_hf_to_mcore("Qwen2-7B-Instruct", "ckpt/qwen2-7b", tp=2, pp=2)
    arch, padded = checkpoint_arch("ckpt/qwen2-7b")          # build GPTModel with these
    load_mcore_weights(model_chunks, "ckpt/qwen2-7b")         # any TP/PP, on every rank
    convert_mcore_to_hf("runs/sft/iter_0001000", "export/sft-hf")

See docs/conversion.md.
"""

from sfmed.convert.errors import (
    CheckpointFormatError,
    CheckpointMismatchError,
    ConversionError,
    HFCheckpointError,
)
from sfmed.convert.hf_to_mcore import convert_hf_to_mcore
from sfmed.convert.mcore_to_hf import checkpoint_arch, convert_mcore_to_hf
from sfmed.convert.report import ConversionSummary
from sfmed.core.ckpt_load import load_mcore_weights

__all__ = [
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "ConversionError",
    "ConversionSummary",
    "HFCheckpointError",
    "checkpoint_arch",
    "convert_hf_to_mcore",
    "convert_mcore_to_hf",
    "load_mcore_weights",
]
