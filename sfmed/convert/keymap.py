"""Names only: which HF tensors make which megatron-core GPTModel checkpoint tensor, for any
registered model family.

The megatron keys are exactly those of ``GPTModel.sharded_state_dict()`` with the local or the
Transformer Engine layer spec (defined in :mod:`sfmed.models.mapping`), layer tensors stacked
over a leading ``num_layers`` axis. The HF names come from the family's mapping.
"""

from __future__ import annotations

from sfmed.models.arch import ModelArch
from sfmed.models.family import family_for
from sfmed.models.mapping import (  # noqa: F401  (the megatron names, importable from here)
    EMBED,
    EXTRA_STATE_MODULES,
    FC1_NORM,
    FC1_W,
    FC2_W,
    FINAL_NORM,
    LAYER_PREFIX,
    OUTPUT,
    PROJ_W,
    QKV_B,
    QKV_NORM,
    QKV_W,
    ModelMapping,
    TensorMapping,
    extra_state_key,
)


def model_mapping(arch: ModelArch) -> ModelMapping:
    """The tensor table of ``arch``'s family."""
    return family_for(arch).mapping(arch)


def tensor_maps(arch: ModelArch) -> list[TensorMapping]:
    """Every checkpoint tensor of ``arch`` (embedding, per-layer tensors, final norm, head)."""
    return list(model_mapping(arch).tensors)


def conversion_order(arch: ModelArch) -> list[tuple[TensorMapping, int | None]]:
    """(tensor, layer) in the order both directions stream them: HF's own parameter order."""
    return model_mapping(arch).order(arch.num_layers)


def hf_names(arch: ModelArch) -> list[str]:
    """All HF tensor names of ``arch``, in conversion order."""
    return [n for m, i in conversion_order(arch) for n in m.hf_names(i)]
