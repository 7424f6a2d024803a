"""Baichuan-7B/13B and Baichuan2-7B/13B (``model_type: baichuan``; the modelling code is hub
remote code, so transformers has no class for them).

LLaMA's decoder with q/k/v fused into one ``W_pack`` (``[q; k; v]`` stacked, multi-head
attention) and, depending on the release:

* positions: RoPE (θ 10000) in the 7B models, **ALiBi** in the 13B models, decided the way the
  releases' own code and vLLM decide it (``hidden_size == 4096`` is a 7B); an explicit
  ``position_embedding_type`` in ``config.json`` wins (tiny test models, custom sizes). ALiBi runs
  in sfmed's SDPA core attention as an additive per-head bias, the slopes split over TP ranks.
* output layer: Baichuan2 (vocabulary 125,696) has a **NormHead** that L2-normalises each
  vocabulary row at run time; an explicit ``norm_head`` in ``config.json`` wins. sfmed normalises
  at run time too (in the megatron output layer) and stores the raw weights: training updates the
  raw weights as the original does, and the exported weights give the hub code identical logits.
  (Folding the normalisation into the weights at conversion would be exact for the converted
  model only: after training the megatron model would use unnormalised rows that the hub code
  then normalises.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from sfmed.core.errors import ConfigError
from sfmed.models.arch import ModelArch
from sfmed.models.families import common
from sfmed.models.families.common import HF_FINAL_NORM, HF_LM_HEAD
from sfmed.models.family import ModelFamily, register_family

HF_W_PACK = "model.layers.{i}.self_attn.W_pack.weight"
BAICHUAN2_VOCAB = 125696

# What the hub's remote code expects in config.json (the files it imports are the user's to add).
AUTO_MAP = {
    "AutoConfig": "configuration_baichuan.BaichuanConfig",
    "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
}


def _positions(cfg: dict) -> str:
    explicit = cfg.get("position_embedding_type")
    if explicit is not None:
        if explicit not in ("rope", "alibi"):
            raise ConfigError(
                f"config.json position_embedding_type={explicit!r}: Baichuan uses 'rope' (7B) "
                "or 'alibi' (13B)"
            )
        return explicit
    return "rope" if int(cfg["hidden_size"]) == 4096 else "alibi"


def _norm_head(cfg: dict) -> bool:
    if cfg.get("norm_head") is not None:
        return bool(cfg["norm_head"])
    return int(cfg["vocab_size"]) == BAICHUAN2_VOCAB


def _check_multi_head(cfg: dict, heads: int, kv: int) -> None:
    if kv != heads:
        raise ConfigError(
            f"num_key_value_heads={kv} != num_attention_heads={heads}: Baichuan's W_pack "
            "holds full multi-head q/k/v"
        )


class NormHeadMixin:
    """An output ``ColumnParallelLinear`` whose rows are L2-normalised at every forward
    (Baichuan2's NormHead). Rows are vocabulary entries and TP splits rows, so each rank
    normalises its own rows without communication; zero padding rows stay zero."""

    def forward(self, input_, weight=None, **kw):
        w = self.weight if weight is None else weight
        return super().forward(input_, weight=torch.nn.functional.normalize(w, dim=-1), **kw)


class BaichuanFamily(ModelFamily):
    """Baichuan's facts (see the module docstring)."""

    model_type = "baichuan"
    hf_architecture = "BaichuanForCausalLM"
    eod_token = "</s>"
    chat_format = "baichuan"
    arch_defaults: ClassVar[dict[str, Any]] = {
        "qkv_bias": False,
        "linear_bias": False,
        "qk_layernorm": False,
    }

    def arch_defaults_for(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Presets and metadata lacking the variant facts get them from the size rule."""
        d = dict(self.arch_defaults)
        if "hidden_size" in fields and "vocab_size" in fields:
            d["position_embedding_type"] = _positions(fields)
            d["norm_head"] = _norm_head(fields)
        return d

    def arch_from_hf(self, cfg: dict) -> ModelArch:
        """Baichuan ``config.json`` -> :class:`ModelArch`."""
        # Baichuan-13B's config.json names its positions model_max_length only
        max_pos = cfg.get("max_position_embeddings") or cfg.get("model_max_length") or 4096
        return common.read_arch(
            cfg,
            family=self.model_type,
            name="Baichuan",
            arch_defaults=self.arch_defaults,
            max_positions=max_pos,
            sliding_window_check=False,
            check=_check_multi_head,
            position_embedding_type=_positions(cfg),
            norm_head=_norm_head(cfg),
        )

    def hf_config_dict(self, arch: ModelArch, dtype: str | None = None) -> dict:
        """The ``config.json`` the hub's remote code reads (with explicit variant facts)."""
        return {
            "architectures": [self.hf_architecture],
            "auto_map": dict(AUTO_MAP),
            "model_type": self.model_type,
            "hidden_act": "silu",
            "hidden_size": arch.hidden_size,
            "intermediate_size": arch.ffn_hidden_size,
            "num_hidden_layers": arch.num_layers,
            "num_attention_heads": arch.num_attention_heads,
            "vocab_size": arch.vocab_size,
            "max_position_embeddings": arch.max_position_embeddings,
            "model_max_length": arch.max_position_embeddings,
            "rms_norm_eps": arch.rms_norm_eps,
            "tie_word_embeddings": arch.tie_word_embeddings,
            "initializer_range": 0.02,
            "use_cache": True,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": dtype or arch.torch_dtype,
            "position_embedding_type": arch.position_embedding_type,
            "norm_head": arch.norm_head,
        }

    # -- megatron side ---------------------------------------------------------------------------

    def gpt_model_kwargs(self, arch: ModelArch) -> dict[str, Any]:
        kw = super().gpt_model_kwargs(arch)
        if arch.position_embedding_type == "alibi":
            kw["position_embedding_type"] = "none"
        return kw

    def finish_model(self, model, arch: ModelArch):
        """ALiBi in every layer's core attention; NormHead on the output layer."""
        from megatron.core import parallel_state as ps

        from sfmed.models.attention import enable_alibi

        if arch.position_embedding_type == "alibi":
            if model.config.context_parallel_size != 1:
                raise ConfigError(
                    "ALiBi (Baichuan-13B) is not supported with context parallelism: each CP "
                    "rank would need the key positions of the others; set parallel.cp=1"
                )
            tp_rank = ps.get_tensor_model_parallel_rank()
            for layer in model.decoder.layers:
                try:
                    enable_alibi(
                        layer.self_attention.core_attention, arch.num_attention_heads, tp_rank
                    )
                except ValueError as e:
                    raise ConfigError(f"Baichuan-13B uses ALiBi: {e}") from None
        if arch.norm_head and getattr(model, "output_layer", None) is not None:
            base = type(model.output_layer)
            model.output_layer.__class__ = type(
                f"NormHead{base.__name__}", (NormHeadMixin, base), {}
            )
        return model

    def mapping(self, arch: ModelArch):
        """Baichuan's tensor table: LLaMA's names with ``W_pack`` for q/k/v."""
        return common.llama_layout_mapping(
            arch,
            packed_qkv=HF_W_PACK,
            ignored_hf_suffixes=(*common.HF_IGNORED_SUFFIXES, ".future_mask"),
        )

    # -- HF side ----------------------------------------------------------------------------------

    def hf_model_class(self):
        """None: Baichuan's modelling code is hub remote code."""
        raise ConfigError(
            "Baichuan has no transformers class (its modelling code is hub remote code); copy "
            "configuration_baichuan.py and modeling_baichuan.py of the release into the folder "
            "and load it with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)"
        )

    def hf_config_class(self):
        """transformers' generic ``PretrainedConfig`` (reads the fields; the hub's
        ``BaichuanConfig`` is remote code)."""
        from transformers import PretrainedConfig

        return PretrainedConfig

    def reference_logits(self, hf_dir, tokens, dtype, device: str):
        """Logits of the hub's remote code, when the folder carries it."""
        if not (Path(hf_dir) / "modeling_baichuan.py").is_file():
            self.hf_model_class()  # raises with the fix
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(hf_dir), trust_remote_code=True, torch_dtype=dtype
        )
        model.to(device).eval()
        with torch.no_grad():
            return model(tokens.to(device)).logits.float().cpu()

    def make_tiny(
        self,
        out_dir,
        *,
        seed: int = 0,
        dtype=None,
        max_shard_size=None,
        num_layers: int = 4,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_heads: int = 8,
        vocab_size: int = 1000,
        position_embedding_type: str = "rope",
        norm_head: bool = True,
        max_position_embeddings: int = 256,
    ) -> Path:
        """Write a tiny random Baichuan (``W_pack`` safetensors + the hub's config fields)."""
        from safetensors.torch import save_file

        arch = ModelArch(
            num_layers=num_layers,
            hidden_size=hidden_size,
            ffn_hidden_size=intermediate_size,
            num_attention_heads=num_heads,
            num_query_groups=num_heads,
            vocab_size=vocab_size,
            max_position_embeddings=max_position_embeddings,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            kv_channels=hidden_size // num_heads,
            torch_dtype="float32",
            family=self.model_type,
            position_embedding_type=position_embedding_type,
            norm_head=norm_head,
            **self.arch_defaults,
        )
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for m, layer in self.mapping(arch).order(num_layers):
            for name, shape in zip(m.hf_names(layer), m.hf_shapes(arch)):
                if name.endswith("norm.weight") or name == HF_FINAL_NORM:
                    t = 1.0 + 0.1 * torch.randn(shape, generator=g)
                else:
                    t = 0.08 * torch.randn(shape, generator=g)
                    if name == HF_LM_HEAD:  # NormHead rows of different norms
                        t = t * (1 + torch.rand(shape[0], 1, generator=g) * 3)
                tensors[name] = t.to(dtype or torch.float32).contiguous()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = self.hf_config_dict(arch, str(dtype or torch.float32).replace("torch.", ""))
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return out


BAICHUAN = register_family(BaichuanFamily())
