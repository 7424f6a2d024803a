"""The items every evaluation task works on, and the error/problem bookkeeping of loaders.

Loaders turn published files into these dataclasses; tasks never look at raw rows. Every item
remembers the file and row it came from so that errors and reports can point back to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sfmed.core.errors import UserError

logger = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """A data or generations file cannot be used as given (names the file, row and fix)."""


@dataclass
class Problems:
    """Collects per-row data problems: raise at once when ``strict``, else count and skip.

    With ``strict=False`` the messages end up in the result JSON (``skipped``) so a reported
    score always says how many rows it silently left out.
    """

    strict: bool = True
    messages: list[str] = field(default_factory=list)

    def report(self, msg: str) -> None:
        """Raise :class:`DataError` (strict) or record ``msg`` and let the caller skip the row."""
        if self.strict:
            raise DataError(f"{msg} (pass strict=false to skip such rows and count them)")
        logger.warning("skipped: %s", msg)
        self.messages.append(msg)


@dataclass
class MCQItem:
    """One multiple-choice question; ``answer`` holds one letter, or several for 多选题."""

    id: str
    question: str
    options: dict[str, str]
    answer: tuple[str, ...]
    subject: str
    source: str
    row: int
    groups: dict[str, str] = field(default_factory=dict)
    explanation: str | None = None
    # The question and option texts exactly as published (prompts that must match another
    # harness byte for byte use these; ``question``/``options`` are whitespace-stripped).
    raw_question: str | None = None
    raw_options: dict[str, str] | None = None

    @property
    def multi(self) -> bool:
        """True when the question expects several letters (exact set match is scored)."""
        return len(self.answer) > 1 or self.groups.get("question_type", "").startswith("多")


@dataclass
class QAItem:
    """One question with its reference answer; ``history`` holds earlier (user, assistant) turns."""

    id: str
    question: str
    reference: str
    source: str
    row: int
    history: list[tuple[str, str]] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)

    def messages(self, system_prompt: str | None = None) -> list[dict[str, str]]:
        """The chat a model answers: optional system prompt, earlier turns, then the question."""
        msgs: list[dict[str, str]] = []
        if system_prompt:
            msgs.append({"role": "system", "content": system_prompt})
        for q, a in self.history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": self.question})
        return msgs


@dataclass
class DrugItem:
    """One drug with its expert-annotated indications (QiZhenGPT's 药品适应症 evaluation)."""

    id: str
    drug: str
    indications: list[str]
    source: str
    row: int


@dataclass
class Dialogue:
    """A doctor–patient consultation: turns of ``patient``/``doctor``, plus the case if known."""

    id: str
    turns: list[tuple[str, str]]
    source: str
    row: int
    case: str | None = None
