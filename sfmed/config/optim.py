"""Schema of the ``optim`` group (``conf/optim/*.yaml``): AdamW, LR schedule, clipping, guard."""

from __future__ import annotations

from dataclasses import dataclass

from sfmed.core.errors import Problems

DECAY_STYLES = ("cosine", "linear", "constant", "WSD", "inverse-square-root")
GUARD_ACTIONS = ("skip", "stop")


@dataclass
class OptimConfig:
    """AdamW with fp32 master weights, warmup then decay to a floor, and a loss guard."""

    lr: float = 1e-5
    """Peak learning rate (reached at the end of warmup)."""

    min_lr: float = 1e-6
    """The floor the schedule decays to."""

    warmup_steps: int | None = None
    """Linear warmup steps; when set, wins over ``warmup_fraction``."""

    warmup_fraction: float | None = None
    """Warmup as a share of the decay horizon (Megatron-LM's ``--lr-warmup-fraction``): the
    shipped optimizer configs use 0.05, which fits runs of any length (100 steps of a 2000-step
    run, 2 of a 30-step one). ``None`` with ``warmup_steps`` unset: no warmup."""

    decay_style: str = "cosine"
    """cosine | linear | constant | WSD (warmup-stable-decay) | inverse-square-root."""

    decay_steps: int | None = None
    """Steps over which the LR decays (warmup included); ``None`` = train.steps."""

    wsd_decay_steps: int | None = None
    """With decay_style=WSD: length of the final decay phase."""

    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""

    nan_action: str = "stop"
    """What a NaN/Inf loss does: ``skip`` the update (data still consumed) or ``stop`` the run
    (the last checkpoint is kept). Always logged."""

    spike_action: str | None = "skip"
    """What a loss spike does (loss > spike_factor × the mean of the last spike_window accepted
    losses): ``skip``, ``stop`` or ``None`` (not checked). Always logged."""

    spike_factor: float = 2.0
    spike_window: int = 50
    spike_min_history: int = 20
    """Spike detection starts once this many losses were accepted."""

    max_consecutive_skips: int = 10
    """Stop the run when this many steps in a row were skipped."""

    def resolve_warmup(self, decay_steps: int) -> int:
        """Warmup steps for a decay horizon of ``decay_steps``: ``warmup_steps`` when set, else
        ``warmup_fraction`` of the horizon (rounded), else 0."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.warmup_fraction:
            return int(round(self.warmup_fraction * decay_steps))
        return 0

    def __post_init__(self):
        p = Problems()
        # min_lr is compared with lr only when lr itself is usable.
        if p.check(self.lr > 0, f"optim.lr={self.lr} must be > 0"):
            p.check(
                0 <= self.min_lr <= self.lr,
                f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]",
            )
        if self.warmup_steps is not None and self.warmup_steps < 0:
            p.add(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            p.add(f"optim.warmup_fraction={self.warmup_fraction} must be in [0, 1), e.g. 0.05")
        p.choice("optim.decay_style", self.decay_style, DECAY_STYLES)
        if self.decay_style == "WSD" and not self.wsd_decay_steps:
            p.add("optim.decay_style=WSD needs optim.wsd_decay_steps >= 1")
        if self.weight_decay < 0 or self.clip_grad < 0:
            p.add("optim.weight_decay and optim.clip_grad must be >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and self.adam_eps > 0):
            p.add(
                f"optim.adam_beta1={self.adam_beta1}, adam_beta2={self.adam_beta2} must be in "
                f"[0, 1) and adam_eps={self.adam_eps} > 0"
            )
        if self.nan_action not in GUARD_ACTIONS:
            p.add(f"optim.nan_action={self.nan_action!r} is not one of {GUARD_ACTIONS}")
        if self.spike_action is not None and self.spike_action not in GUARD_ACTIONS:
            p.add(f"optim.spike_action={self.spike_action!r} is not one of {GUARD_ACTIONS} or null")
        if self.spike_factor <= 1 or self.spike_window < 1 or self.spike_min_history < 1:
            p.add("optim.spike_factor must be > 1, spike_window and spike_min_history >= 1")
        if self.max_consecutive_skips < 1:
            p.add(f"optim.max_consecutive_skips={self.max_consecutive_skips} must be >= 1")
        p.raise_if_any()
