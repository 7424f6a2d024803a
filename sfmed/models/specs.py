"""Decoder block specs for training: which modules megatron-core builds, chosen by spec.

The architecture varies by ``ModuleSpec`` (megatron-core's idea), never by ``if`` in forward:

* ``transformer_engine``: megatron's TE block spec (fused LayerNorm+Linear, TE attention with
  its flash/cuDNN backends, FP8, context parallelism).
* ``local``: megatron's local spec (no TE, no apex) with the core attention swapped for
  :class:`~sfmed.models.attention.SDPAttention` / :class:`~sfmed.models.attention.FlashAttention`
  (or megatron's unfused ``DotProductAttention``) and every RMSNorm — the final one too — swapped
  for :class:`~sfmed.models.norm.RMSNorm`, which supports sequence parallelism.
"""

from __future__ import annotations

import copy
import importlib.util

from sfmed.models.attention import FlashAttention, SDPAttention
from sfmed.models.norm import RMSNorm


def te_available() -> bool:
    """Whether Transformer Engine's PyTorch extension can be imported."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # broken TE builds raise all kinds of errors at import
        return False
    return True


def te_version() -> str | None:
    """The installed Transformer Engine version (``None`` when it is not installed)."""
    try:
        import transformer_engine

        version = getattr(transformer_engine, "__version__", None)
    except Exception:
        version = None
    if version is None:
        from importlib import metadata

        for dist in ("transformer-engine", "transformer_engine", "transformer-engine-torch"):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
    return version


def flash_attn_status() -> tuple[bool, str]:
    """(usable, reason): whether ``flash_attn.flash_attn_func`` imports, and why not.

    Imported, not only found: a wheel built against another torch (undefined symbols), a
    namespace-only folder or a CPU-only build is "found" by ``find_spec`` but fails at model
    build with a misleading message.
    """
    if importlib.util.find_spec("flash_attn") is None:
        return False, "the flash-attn package is not installed"
    try:
        from flash_attn import flash_attn_func  # noqa: F401
    except Exception as e:  # ImportError, OSError (undefined symbol), RuntimeError, ...
        return (
            False,
            f"flash-attn is installed but `from flash_attn import flash_attn_func` fails ({type(e).__name__}: {e})",
        )
    return True, "flash_attn_func imports"


def flash_attn_available() -> bool:
    """Whether flash-attn's ``flash_attn_func`` can be imported (:func:`flash_attn_status`)."""
    return flash_attn_status()[0]


def grad_accum_fusion_available() -> bool:
    """Whether apex's ``fused_weight_gradient_mlp_cuda`` extension imports.

    megatron's own ``ColumnParallelLinear`` (GPTModel's output layer, also under the TE spec)
    raises at construction when ``gradient_accumulation_fusion`` is on without it; Transformer
    Engine does not ship it. Megatron-LM checks the same import before enabling the fusion.
    """
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except Exception:
        return False
    return True


def core_attention_module(backend: str):
    """The core-attention class of the local spec for ``backend`` (sdpa | flash | unfused)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    table = {"sdpa": SDPAttention, "flash": FlashAttention, "unfused": DotProductAttention}
    if backend not in table:
        raise ValueError(f"attention backend {backend!r} is not one of {sorted(table)}")
    return table[backend]


def local_layer_spec(attention: str = "sdpa", qk_layernorm: bool = False):
    """megatron's local GPT layer spec with sfmed's attention and SP-capable RMSNorm."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = copy.deepcopy(
        get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    )
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    spec.submodules.self_attention.submodules.core_attention = core_attention_module(attention)
    return spec


def decoder_layer_spec(config, impl: str = "local", attention: str = "sdpa", vp_stage=None):
    """``TransformerBlockSubmodules`` for this rank's (virtual) pipeline stage: the one layer-spec
    path of sfmed (training, conversion checks and verification all build with it).

    ``impl`` is ``local`` or ``transformer_engine``; ``attention`` (sdpa | flash | unfused)
    applies to ``local`` only. The architecture's spec choices (q/k norm; biases are
    ``TransformerConfig`` fields) are read from ``config``, which
    :func:`sfmed.models.transformer_config` fills from the model family.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if impl == "transformer_engine":
        return get_gpt_decoder_block_spec(
            config,
            use_transformer_engine=True,
            normalization="RMSNorm",
            vp_stage=vp_stage,  # reads qk_layernorm from config itself
        )
    if impl != "local":
        raise ValueError(f"transformer impl {impl!r} is not 'local' or 'transformer_engine'")
    # Every layer of a dense decoder has the same spec, so this stage's slice is n copies.
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    spec = local_layer_spec(attention, qk_layernorm=config.qk_layernorm)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=RMSNorm)


"""The name training used before the one-spec-path change (kept while callers move over)."""
