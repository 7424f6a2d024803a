"""Model families: the registry keyed by HF ``model_type`` and the :class:`ModelFamily` base.

A family is one module under :mod:`sfmed.models.families` holding everything sfmed knows about a
checkpoint family: ``config.json`` ⇄ :class:`~sfmed.models.arch.ModelArch` (with refusals of what
megatron-core's GPTModel cannot represent), the tensor mapping, layer-spec choices, the HF
classes used for export and verification, tokenizer defaults and a tiny-model builder. Generic
code asks the registry (:func:`get_family`, :func:`family_for`) and never names a family.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sfmed.core.errors import ConfigError
from sfmed.models.arch import ModelArch

if TYPE_CHECKING:
    from sfmed.models.mapping import ModelMapping


class ModelFamily:
    """What one checkpoint family contributes. Subclass it in a module under
    :mod:`sfmed.models.families` and list that module in the package's ``FAMILY_MODULES``."""

    model_type: ClassVar[str]
    """HF ``config.json`` ``model_type`` (the registry key, stored as ``ModelArch.family``)."""
    hf_architecture: ClassVar[str]
    """HF model class name written into exported ``config.json`` ``architectures``."""
    eod_token: ClassVar[str | None] = None
    """The end-of-document token pretraining appends between documents."""
    chat_format: ClassVar[str] = "template"
    """The conversation format of the family's chat releases: a name in the chat-format
    registry :data:`sfmed.eval.chat_formats.CHAT_FORMATS`."""
    arch_defaults: ClassVar[dict[str, Any]] = {}
    """ModelArch fields a stored ``sfmed.json`` may lack (written before they existed)."""

    # -- architecture facts -------------------------------------------------------------------

    def arch_defaults_for(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The defaults of the ModelArch fields ``fields`` (a preset, stored metadata) lacks;
        families whose variants differ by size override it."""
        return dict(self.arch_defaults)

    def arch_from_hf(self, cfg: dict) -> ModelArch:
        """``config.json`` dict -> :class:`ModelArch`; raise ConfigError for what cannot be
        represented exactly."""
        raise NotImplementedError

    def hf_config_dict(self, arch: ModelArch, dtype: str | None = None) -> dict:
        """A ``config.json`` dict describing ``arch`` (export without an original config)."""
        raise NotImplementedError

    def transformer_config_kwargs(self, arch: ModelArch) -> dict[str, Any]:
        """megatron ``TransformerConfig`` arguments that describe the architecture.

        The default is a pre-norm RMSNorm/SwiGLU/RoPE decoder with ``arch``'s bias and q/k-norm
        facts; families with another shape override it.
        """
        import torch

        return dict(
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
            add_bias_linear=arch.linear_bias,
            add_qkv_bias=arch.qkv_bias,
            qk_layernorm=arch.qk_layernorm,
        )

    def gpt_model_kwargs(self, arch: ModelArch) -> dict[str, Any]:
        """megatron ``GPTModel`` arguments that describe the architecture (positions, tying)."""
        return dict(
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=arch.rope_theta,
        )

    # -- conversion ---------------------------------------------------------------------------

    def mapping(self, arch: ModelArch) -> ModelMapping:
        """The tensor table of ``arch`` (see :mod:`sfmed.models.mapping`)."""
        raise NotImplementedError

    def finish_model(self, model, arch: ModelArch):
        """Adjust a freshly built GPTModel stage for what megatron-core has no option for
        (e.g. a normalised output layer, ALiBi); the default changes nothing."""
        return model

    # -- transformers side ----------------------------------------------------------------------

    def hf_model_class(self):
        """The transformers causal-LM class (reference logits in verification)."""
        raise NotImplementedError

    def hf_config_class(self):
        """The transformers config class."""
        raise NotImplementedError

    def reference_logits(self, hf_dir: str | Path, tokens, dtype, device: str):
        """Logits of the HF model in ``hf_dir`` for ``tokens`` (the reference of verification):
        the family's transformers class by default."""
        import transformers

        # transformers 5 names the argument dtype; 4.x calls it torch_dtype
        key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        model = self.hf_model_class().from_pretrained(str(hf_dir), **{key: dtype})
        model.to(device).eval()
        import torch

        with torch.no_grad():
            return model(tokens.to(device)).logits.float().cpu()

    # -- tests and the demo ---------------------------------------------------------------------

    def make_tiny(self, out_dir: str | Path, *, seed: int = 0, **kw) -> Path:
        """Write a tiny random HF model of this family to ``out_dir`` (no download)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<model family {self.model_type}>"


_REGISTRY: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry under its ``model_type`` (once)."""
    key = family.model_type
    if key in _REGISTRY and type(_REGISTRY[key]) is not type(family):
        raise ValueError(f"model family {key!r} is registered twice")
    _REGISTRY[key] = family
    return family


def _load_families() -> None:
    import importlib

    from sfmed.models.families import FAMILY_MODULES

    for name in FAMILY_MODULES:
        importlib.import_module(name)


def registered_families() -> tuple[str, ...]:
    """The ``model_type`` of every family sfmed supports."""
    _load_families()
    return tuple(sorted(_REGISTRY))


def get_family(name: str) -> ModelFamily:
    """The family registered for the HF ``model_type`` ``name``."""
    _load_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"model_type={name!r} is not supported; sfmed converts {', '.join(sorted(_REGISTRY))}"
        ) from None


def family_for(arch: ModelArch) -> ModelFamily:
    """The family that reads and writes ``arch``."""
    return get_family(arch.family)


def read_hf_config(cfg: dict | str | Path) -> dict:
    """A ``config.json`` as a dict (given as dict, path to the file or to its folder)."""
    if isinstance(cfg, dict):
        return cfg
    p = Path(cfg)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"no config.json at {p}; point to a Hugging Face model folder")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from e


def arch_from_hf_config(cfg: dict | str | Path) -> ModelArch:
    """Read an HF ``config.json`` (dict, file or folder) with the family its ``model_type``
    names. Refuses what megatron-core's GPTModel cannot represent exactly."""
    cfg = read_hf_config(cfg)
    mt = cfg.get("model_type")
    if not isinstance(mt, str):
        raise ConfigError(
            f"config.json has model_type={mt!r}; sfmed converts {', '.join(registered_families())}"
        )
    return get_family(mt).arch_from_hf(cfg)
