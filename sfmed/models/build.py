"""megatron-core objects for a :class:`~sfmed.models.arch.ModelArch`: ``TransformerConfig`` and
``GPTModel``. Conversion checks, verification and training all build their model here, with the
layer spec of :func:`sfmed.models.specs.decoder_layer_spec`.
"""

from __future__ import annotations

from typing import Any

import torch

from sfmed.core.errors import ConfigError
from sfmed.core.parallel import validate_parallel
from sfmed.models.arch import ModelArch, padded_vocab_size
from sfmed.models.family import family_for


def transformer_config(
    arch: ModelArch,
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
        **family_for(arch).transformer_config_kwargs(arch),
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


def build_model(
    arch: ModelArch,
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

    ``spec`` defaults to :func:`~sfmed.models.specs.decoder_layer_spec` (local implementation,
    SDPA attention) — the spec training uses. ``padded_vocab_size`` (e.g. a checkpoint's
    ``sfmed.json`` value, see ``sfmed.convert.checkpoint_arch``) fixes the embedding rows;
    without it Megatron's rule :func:`~sfmed.models.arch.padded_vocab_size` at this TP size is
    used.
    """
    from megatron.core.models.gpt import GPTModel

    from sfmed.models.specs import decoder_layer_spec

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
    if spec is None:
        spec = decoder_layer_spec(config, vp_stage=vp_stage)
    family = family_for(arch)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=max_sequence_length or arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        vp_stage=vp_stage,
        **family.gpt_model_kwargs(arch),
    )
    return family.finish_model(model, arch)


_megatron_padded_vocab = padded_vocab_size  # build_model's keyword shadows the function name
