"""Schema of ``launch/sft.py``: the shared run config plus the SFT ``data`` group and the engine.

Supervised fine-tuning reads the chat datasets ``launch/preprocess.py format=sft`` writes
(``<prefix>.bin/.idx`` token ids, ``<prefix>_mask.*`` loss mask, ``<prefix>.json`` sidecar; see
``docs/sft.md``). Two engines train on them: ``mcore`` (full-parameter on megatron-core at any
TP/PP, :mod:`sfmed.recipes.sft`) and ``hf`` (TRL/PEFT on a Hugging Face folder,
``sfmed.hf_engine.sft``). Schemas import neither torch nor Hydra at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sfmed.config.pretrain_data import parse_split
from sfmed.config.run import RunConfig
from sfmed.config.sft_data import MASK_MODES
from sfmed.core.errors import Problems

ENGINES = ("mcore", "hf")

__all__ = [
    "ENGINES",
    "ChatDataConfig",
    "HFEngineConfig",
    "LoraConfig",
    "SFTConfig",
    "SFTDataConfig",
    "register",
]


@dataclass
class ChatDataConfig:
    """Which chat datasets a stage trains on, as ``launch/preprocess.py`` wrote them (shared by
    SFT's and DPO's ``data`` groups)."""

    prefix: str | None = None
    """One SFT dataset: the path without ``.bin``/``.idx`` (e.g. ``data/sft/chatmed_sft``)."""

    blend: list[Any] | None = None
    """Several: ``[{prefix: ..., weight: 0.3}, ...]``; samples are drawn in proportion to the
    weights (a dataset smaller than its share is repeated, reshuffled each epoch)."""

    seq_length: int | None = None
    """Tokens per training sequence; default: the ``chat.seq_length`` the data was prepared
    with (every dataset of a blend must agree). Larger values pad; smaller ones are refused."""

    packed: bool | None = None
    """Expected packing of the data (``true``: several conversations per sample); checked
    against the datasets when set."""

    pad_id: int | None = None
    """Token id of the padding that fills each sample to ``seq_length`` (never attended to by
    the conversations and never in the loss); default: the tokenizer's EOD id from the sidecar."""

    split: str = "100,0,0"
    """train,valid,test proportions of each dataset's samples (a fixed seeded partition)."""

    num_workers: int = 1
    """DataLoader worker processes per rank (0 = load in the training process)."""

    def __post_init__(self):
        p = Problems()
        if self.prefix is not None and self.blend is not None:
            p.add(
                "data.prefix and data.blend are both set; give one (one dataset is "
                "data.prefix=<path>, several are data.blend=[{prefix: ..., weight: ...}, ...])"
            )
        if self.seq_length is not None and self.seq_length < 16:
            p.add(f"data.seq_length={self.seq_length} must be >= 16 (or null)")
        if self.num_workers < 0:
            p.add(f"data.num_workers={self.num_workers} must be >= 0")
        with p.collect():
            parse_split(self.split)
        for i, e in enumerate(self.blend or []):
            if not hasattr(e, "get") or e.get("prefix") is None:
                p.add(f"data.blend[{i}]={e!r} needs a prefix: {{prefix: <path>, weight: <w>}}")
                continue
            w = e.get("weight", 1.0)
            if not isinstance(w, (int, float)) or w <= 0:
                p.add(f"data.blend[{i}].weight={w!r} must be a number > 0")
        p.raise_if_any()

    @property
    def split_weights(self) -> tuple[float, float, float]:
        """``split`` as (train, valid, test) proportions."""
        return parse_split(self.split)


@dataclass
class SFTDataConfig(ChatDataConfig):
    """Which SFT datasets to train on (``conf/data/sft_*.yaml``), as preprocessing wrote them."""

    mask: str | None = None
    """Expected loss-mask mode of the data (``all`` | ``last``); checked against each dataset's
    sidecar when set (the mask is fixed at preprocessing)."""

    def __post_init__(self):
        p = Problems()
        with p.collect():
            super().__post_init__()
        if self.mask is not None and self.mask not in MASK_MODES:
            p.add(f"data.mask={self.mask!r} is not one of {list(MASK_MODES)} (or null)")
        p.raise_if_any()


@dataclass
class LoraConfig:
    """LoRA adapters of the HF engine (PEFT ``LoraConfig``)."""

    enabled: bool = False
    """false: full-parameter fine-tuning; true: train LoRA adapters only."""
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"]
    )  # fmt: skip
    """Module names PEFT wraps (Qwen2/LLaMA names)."""


@dataclass
class HFEngineConfig:
    """Settings only the HF engine (``engine=hf``: TRL ``SFTTrainer`` + PEFT) reads."""

    model: str | None = None
    """Hugging Face folder to fine-tune (``launch/convert.py to=hf`` output or any HF Qwen2)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    export: str = "merged"
    """What the run writes at the end with LoRA: ``merged`` | ``adapter`` | ``both``."""
    attn_implementation: str = "sdpa"
    """transformers attention: ``sdpa`` / ``eager`` (packed samples get a block-diagonal mask)
    or ``flash_attention_2`` (varlen kernels, memory-linear; GPU with flash-attn installed)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward (transformers gradient checkpointing)."""


@dataclass
class SFTConfig(RunConfig):
    """Supervised fine-tuning on chat datasets (sharded on megatron-core, or the HF engine)."""

    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    engine: str = "mcore"
    """``mcore``: full-parameter on megatron-core at any TP/PP (``torchrun launch/sft.py``);
    ``hf``: TRL ``SFTTrainer`` (+ PEFT LoRA) on a Hugging Face folder (``hf.*``)."""
    hf: HFEngineConfig = field(default_factory=HFEngineConfig)
    run_name: str = "sft"

    def __post_init__(self):
        p = Problems()
        with p.collect():
            super().__post_init__()
        p.choice("engine", self.engine, ENGINES)
        p.raise_if_any()


def register() -> None:
    """Register the schema as ``sft_schema`` in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="sft_schema", node=SFTConfig)
