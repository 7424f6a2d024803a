"""Names only: which HF Qwen2 tensors make which megatron-core GPTModel checkpoint tensor.

The megatron keys are exactly those of ``GPTModel.sharded_state_dict()`` with the local or the
Transformer Engine layer spec (the local spec maps its norms onto TE's fused names), layer tensors
stacked over a leading ``num_layers`` axis. How tensors are fused, split and padded lives in
:mod:`sfmed.convert.tensors`; this module only says what goes where.
"""

from __future__ import annotations

from dataclasses import dataclass

from sfmed.models.qwen2 import Qwen2Arch

# Whole-model tensors.
EMBED = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
HF_EMBED = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"

# Per-layer tensors (stacked over layers in the checkpoint).
LAYER_PREFIX = "decoder.layers."
QKV_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
QKV_W = "decoder.layers.self_attention.linear_qkv.weight"
QKV_B = "decoder.layers.self_attention.linear_qkv.bias"
PROJ_W = "decoder.layers.self_attention.linear_proj.weight"
FC1_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
FC1_W = "decoder.layers.mlp.linear_fc1.weight"
FC2_W = "decoder.layers.mlp.linear_fc2.weight"

# Modules whose (empty, for megatron's local linears) ``_extra_state`` GPTModel checkpoints as a
# ShardedObject per layer; dist_checkpointing.load of a local-spec model asks for them.
EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)

# HF buffers that older checkpoints carry but that are derived, not learned.
HF_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# How a tensor is laid out across tensor-parallel ranks.
REPLICATED = "replicated"  # every TP rank holds all of it (norms)
ROWS = "rows"  # split along axis 0 (column-parallel output rows, vocab rows)
COLS = "cols"  # split along axis 1 (row-parallel input columns)
GATE_UP = "gate_up"  # [gate; up] fused along axis 0, each half split along axis 0


@dataclass(frozen=True)
class TensorMap:
    """One megatron checkpoint tensor and the HF tensors it is made of."""

    mcore: str
    hf: tuple[str, ...]
    """HF names; ``{i}`` stands for the layer index in per-layer tensors."""
    tp: str
    """TP layout: REPLICATED, ROWS, COLS or GATE_UP."""
    kind: str = "plain"
    """plain | qkv (per-query-group interleave) | gate_up | vocab (padded rows)."""

    @property
    def layered(self) -> bool:
        return self.mcore.startswith(LAYER_PREFIX)

    def hf_names(self, layer: int | None = None) -> tuple[str, ...]:
        return tuple(n.format(i=layer) for n in self.hf)


def _attn(name: str) -> str:
    return "model.layers.{i}.self_attn." + name


def _mlp(name: str) -> str:
    return "model.layers.{i}.mlp." + name


LAYER_MAPS: tuple[TensorMap, ...] = (
    TensorMap(QKV_NORM, ("model.layers.{i}.input_layernorm.weight",), REPLICATED),
    TensorMap(
        QKV_W, (_attn("q_proj.weight"), _attn("k_proj.weight"), _attn("v_proj.weight")), ROWS, "qkv"
    ),
    TensorMap(
        QKV_B, (_attn("q_proj.bias"), _attn("k_proj.bias"), _attn("v_proj.bias")), ROWS, "qkv"
    ),
    TensorMap(PROJ_W, (_attn("o_proj.weight"),), COLS),
    TensorMap(FC1_NORM, ("model.layers.{i}.post_attention_layernorm.weight",), REPLICATED),
    TensorMap(FC1_W, (_mlp("gate_proj.weight"), _mlp("up_proj.weight")), GATE_UP, "gate_up"),
    TensorMap(FC2_W, (_mlp("down_proj.weight"),), COLS),
)


def tensor_maps(arch: Qwen2Arch) -> list[TensorMap]:
    """Every checkpoint tensor of ``arch`` (embedding, per-layer tensors, final norm, head)."""
    maps = [TensorMap(EMBED, (HF_EMBED,), ROWS, "vocab"), *LAYER_MAPS]
    maps.append(TensorMap(FINAL_NORM, (HF_FINAL_NORM,), REPLICATED))
    if not arch.tie_word_embeddings:
        maps.append(TensorMap(OUTPUT, (HF_LM_HEAD,), ROWS, "vocab"))
    return maps


def conversion_order(arch: Qwen2Arch) -> list[tuple[TensorMap, int | None]]:
    """(tensor, layer) in the order both directions stream them: HF's own parameter order."""
    maps = tensor_maps(arch)
    order: list[tuple[TensorMap, int | None]] = [(maps[0], None)]
    order += [(m, i) for i in range(arch.num_layers) for m in LAYER_MAPS]
    order += [(m, None) for m in maps[1 + len(LAYER_MAPS) :]]
    return order


def hf_names(arch: Qwen2Arch) -> list[str]:
    """All HF tensor names of ``arch``, in conversion order."""
    return [n for m, i in conversion_order(arch) for n in m.hf_names(i)]


def extra_state_key(module: str, layer: int, num_layers: int) -> str:
    """The ShardedObject unique key megatron-core uses for a layer module's ``_extra_state``."""
    return f"{LAYER_PREFIX}{module}._extra_state/shard_{layer}_{num_layers}"
