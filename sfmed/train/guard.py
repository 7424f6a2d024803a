"""Loss guard: decide, before the optimizer step, whether a step's update is applied.

A NaN/Inf loss or a spike (loss above ``factor`` × the mean of the recent accepted losses) makes
the step ``skip`` (no update; its data counts as consumed) or ``stop`` the run, as configured.
Every rank sees the same all-reduced loss, so every rank takes the same decision. The state is
saved in checkpoints so a resumed run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """``action`` is ``apply``, ``skip`` or ``stop``; ``reason`` says why (empty for apply)."""

    action: str
    reason: str = ""


class LossGuard:
    """Stateful NaN / spike detector (see module docstring)."""

    def __init__(
        self,
        nan_action: str = "stop",
        spike_action: str | None = "skip",
        factor: float = 2.0,
        window: int = 50,
        min_history: int = 20,
        max_consecutive_skips: int = 10,
    ):
        self.nan_action, self.spike_action = nan_action, spike_action
        self.factor, self.min_history = factor, min_history
        self.max_consecutive_skips = max_consecutive_skips
        self.history: deque[float] = deque(maxlen=window)
        self.consecutive_skips = 0
        self.skipped_total = 0

    def check(self, loss: float) -> Verdict:
        """The verdict for a step whose (global, per-token) loss is ``loss``."""
        verdict = Verdict("apply")
        if not math.isfinite(loss):
            verdict = Verdict(self.nan_action, f"non-finite loss {loss}")
        elif self.spike_action and len(self.history) >= self.min_history:
            mean = sum(self.history) / len(self.history)
            if loss > self.factor * mean:
                verdict = Verdict(
                    self.spike_action,
                    f"loss spike {loss:.4f} > {self.factor} × recent mean {mean:.4f}",
                )
        if verdict.action == "skip":
            self.consecutive_skips += 1
            self.skipped_total += 1
            if self.consecutive_skips >= self.max_consecutive_skips:
                return Verdict(
                    "stop", f"{verdict.reason}; {self.consecutive_skips} steps skipped in a row"
                )
        return verdict

    def accept(self, loss: float) -> None:
        """Record the loss of an applied step."""
        self.history.append(float(loss))
        self.consecutive_skips = 0

    def state_dict(self) -> dict:
        """Checkpointable state."""
        return {
            "history": list(self.history),
            "consecutive_skips": self.consecutive_skips,
            "skipped_total": self.skipped_total,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.history.clear()
        self.history.extend(state.get("history", []))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
