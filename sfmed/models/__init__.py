"""Model families and how megatron-core builds them.

``import sfmed.models`` is cheap: names that need torch or megatron load on first use.

- :class:`ModelArch` and its JSON form (:func:`arch_to_dict`, :func:`arch_from_dict`);
- the family registry keyed by HF ``model_type`` (:func:`get_family`, :func:`family_for`,
  :func:`registered_families`, :func:`arch_from_hf_config`);
- vocabulary padding (:func:`padded_vocab_size`, :func:`checkpoint_vocab_size`,
  :data:`VOCAB_PAD_TP`) and TP/PP checks (:func:`validate_parallel`);
- megatron objects: :func:`transformer_config`, :func:`build_model`, and
  :func:`decoder_layer_spec`, the one layer-spec path.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "ModelArch": "sfmed.models.arch",
    "arch_to_dict": "sfmed.models.arch",
    "arch_from_dict": "sfmed.models.arch",
    "padded_vocab_size": "sfmed.models.arch",
    "checkpoint_vocab_size": "sfmed.models.arch",
    "VOCAB_PAD_TP": "sfmed.models.arch",
    "ModelFamily": "sfmed.models.family",
    "get_family": "sfmed.models.family",
    "family_for": "sfmed.models.family",
    "registered_families": "sfmed.models.family",
    "register_family": "sfmed.models.family",
    "arch_from_hf_config": "sfmed.models.family",
    "read_hf_config": "sfmed.models.family",
    "validate_parallel": "sfmed.core.parallel",
    "validate_parallel_sizes": "sfmed.core.parallel",
    "validate_vpp": "sfmed.core.parallel",
    "validate_sequence_split": "sfmed.core.parallel",
    "transformer_config": "sfmed.models.build",
    "build_model": "sfmed.models.build",
    "decoder_layer_spec": "sfmed.models.specs",
    "te_available": "sfmed.models.specs",
    "flash_attn_available": "sfmed.models.specs",
}

__all__ = [
    "ModelArch",
    "ModelFamily",
    "VOCAB_PAD_TP",
    "arch_from_dict",
    "arch_from_hf_config",
    "arch_to_dict",
    "build_model",
    "checkpoint_vocab_size",
    "decoder_layer_spec",
    "family_for",
    "flash_attn_available",
    "get_family",
    "padded_vocab_size",
    "read_hf_config",
    "register_family",
    "registered_families",
    "te_available",
    "transformer_config",
    "validate_parallel",
    "validate_parallel_sizes",
    "validate_sequence_split",
    "validate_vpp",
]

if TYPE_CHECKING:
    from sfmed.core.parallel import (
        validate_parallel,
        validate_parallel_sizes,
        validate_sequence_split,
        validate_vpp,
    )
    from sfmed.models.arch import (
        VOCAB_PAD_TP,
        ModelArch,
        arch_from_dict,
        arch_to_dict,
        checkpoint_vocab_size,
        padded_vocab_size,
    )
    from sfmed.models.build import build_model, transformer_config
    from sfmed.models.family import (
        ModelFamily,
        arch_from_hf_config,
        family_for,
        get_family,
        read_hf_config,
        register_family,
        registered_families,
    )
    from sfmed.models.specs import decoder_layer_spec, flash_attn_available, te_available


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sfmed.models' has no attribute {name!r}")
