"""Schema of ``launch/dpo.py``: the shared run config plus DPO's ``data``, ``dpo`` (the loss),
``reference`` and the engine.

Preference alignment reads the pair datasets ``launch/preprocess.py format=preference`` writes
(chosen and rejected answers of a pair side by side, always in the same sample). Two engines
train on them: ``mcore`` (full-parameter on megatron-core at any TP/PP, :mod:`sfmed.recipes.dpo`)
and ``hf`` (TRL ``DPOTrainer`` on a Hugging Face folder, ``sfmed.hf_engine.dpo``). Both compute
the loss with :func:`sfmed.recipes.dpo_loss.dpo_loss` from :class:`DPOLossConfig`. Schemas
import neither torch nor Hydra at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sfmed.config.run import RunConfig
from sfmed.config.sft import ENGINES, ChatDataConfig, HFEngineConfig
from sfmed.core.errors import Problems

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
REFERENCE_MODES = ("precompute", "on_the_fly")

__all__ = [
    "LOSS_TYPES",
    "REFERENCE_MODES",
    "DPOConfig",
    "DPODataConfig",
    "DPOLossConfig",
    "ReferenceConfig",
    "register",
]


@dataclass
class DPODataConfig(ChatDataConfig):
    """Which preference datasets to train on (``conf/data/dpo_*.yaml``): outputs of
    ``launch/preprocess.py format=preference``. A sample is one pair, or with ``chat.pack=true``
    several whole pairs packed together (the chosen and rejected side of a pair are never split)."""


@dataclass
class DPOLossConfig:
    """Which preference loss, and its constants. Validated on construction."""

    loss_type: str = "sigmoid"
    """sigmoid (DPO; conservative DPO with label_smoothing > 0) | ipo | hinge | robust (rDPO)."""

    beta: float = 0.1
    """β: the strength of the KL penalty to the reference (τ in the IPO paper)."""

    label_smoothing: float = 0.0
    """ε, the assumed probability that a preference label is flipped. sigmoid: conservative
    DPO, ε in [0, 0.5]; robust: ε in [0, 0.5). Not defined for ipo and hinge."""

    rpo_alpha: float | None = None
    """α of RPO: adds α × (the chosen answers' per-token NLL) to the loss. ``None`` = off."""

    reference_free: bool = False
    """Score against a uniform reference (reference log-probs taken as 0): no reference model."""

    def __post_init__(self):
        p = Problems()
        loss_ok = p.check(
            self.loss_type in LOSS_TYPES,
            f"dpo.loss_type={self.loss_type!r} is not one of {list(LOSS_TYPES)}; pick one of those",
        )
        if not (isinstance(self.beta, int | float) and self.beta > 0):
            p.add(f"dpo.beta={self.beta!r} must be a number > 0 (typical: 0.1)")
        eps = self.label_smoothing
        # Which label_smoothing is valid depends on the loss; judged only for a known loss.
        if loss_ok and self.loss_type in ("ipo", "hinge") and eps != 0:
            p.add(
                f"dpo.label_smoothing={eps} has no meaning for dpo.loss_type={self.loss_type}; "
                "set it to 0, or use loss_type=sigmoid (conservative DPO) or robust"
            )
        if loss_ok and self.loss_type == "sigmoid" and not 0 <= eps <= 0.5:
            p.add(f"dpo.label_smoothing={eps} must be in [0, 0.5] for sigmoid")
        if loss_ok and self.loss_type == "robust" and not 0 <= eps < 0.5:
            p.add(
                f"dpo.label_smoothing={eps} must be in [0, 0.5) for robust (it divides by 1 - 2ε)"
            )
        if self.rpo_alpha is not None and not self.rpo_alpha >= 0:
            p.add(
                f"dpo.rpo_alpha={self.rpo_alpha} must be >= 0, or null to switch the NLL term off"
            )
        p.raise_if_any()

    @property
    def needs_token_counts(self) -> bool:
        """Whether :func:`dpo_loss` needs the answers' token counts (IPO, RPO)."""
        return self.loss_type == "ipo" or self.rpo_alpha is not None


@dataclass
class ReferenceConfig:
    """The frozen reference model DPO scores against (ignored with ``dpo.reference_free``)."""

    mode: str = "precompute"
    """``precompute``: one forward pass over the training pairs before the first step, in the
    policy's exact sharding and packing layout, stored beside the run (no second model in
    memory while training); ``on_the_fly``: a second frozen model in the same layout, scored
    every step (one more forward per step and the memory of a second set of weights)."""

    checkpoint: str | None = None
    """Megatron checkpoint of the reference; ``null``: the run's ``init_from`` (the usual
    choice: the SFT model the policy starts from)."""

    def __post_init__(self):
        p = Problems()
        p.choice("reference.mode", self.mode, REFERENCE_MODES)
        if self.checkpoint is not None and not str(self.checkpoint).strip():
            p.add("reference.checkpoint is empty; give a checkpoint path, or null for init_from")
        p.raise_if_any()


@dataclass
class DPOConfig(RunConfig):
    """Preference alignment (DPO and its variants), sharded on megatron-core or the HF engine."""

    data: DPODataConfig = field(default_factory=DPODataConfig)
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    engine: str = "mcore"
    """``mcore``: full-parameter on megatron-core at any TP/PP (``torchrun launch/dpo.py``);
    ``hf``: TRL ``DPOTrainer`` (+ PEFT LoRA) on a Hugging Face folder (``hf.*``)."""
    hf: HFEngineConfig = field(default_factory=HFEngineConfig)
    run_name: str = "dpo"

    def __post_init__(self):
        p = Problems()
        with p.collect():
            super().__post_init__()
        p.choice("engine", self.engine, ENGINES)
        p.raise_if_any()


def register() -> None:
    """Register the schema as ``dpo_schema`` in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="dpo_schema", node=DPOConfig)
