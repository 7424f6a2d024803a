"""The one family of errors a user can cause.

Every error whose cause is the user's input or configuration derives from :class:`UserError`.
Its message names the offending value and the fix; the entry points print it once, without a
traceback, and exit 2 (:func:`sfmed.core.cli.run_cli`). Anything else is a bug and keeps its
traceback. This module imports nothing but the standard library, so config schemas can use it
without pulling in torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Base of every error the user can fix (bad config value, bad input file, occupied output)."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration value cannot be used; the message names the value and the fix."""


class ConfigErrors(ConfigError):
    """Several configuration problems, reported together (one per line, each once)."""

    def __init__(self, problems: list[str]):
        # A problem found twice (by a group and by a cross-group check) is still one problem.
        self.problems = list(dict.fromkeys(problems))
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            body = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{len(self.problems)} problems:\n{body}")


def config_problems(err: ConfigError) -> list[str]:
    """The problems ``err`` reports: each of a :class:`ConfigErrors`, else its one message."""
    return list(err.problems) if isinstance(err, ConfigErrors) else [str(err)]


class Problems:
    """A schema's problems, collected so that all of them are reported at once.

    Usage in a ``__post_init__``::

        p = Problems()
        if self.lr <= 0:
            p.add(f"optim.lr={self.lr} must be > 0")
        elif self.min_lr > self.lr:  # dependent: only against a valid lr
            p.add(...)
        p.choice("optim.decay_style", self.decay_style, DECAY_STYLES)
        with p.collect():  # a validator that raises (a parent's __post_init__, a parser)
            parse_split(self.split)
        p.raise_if_any()

    ``raise_if_any`` raises ``error`` (a :class:`ConfigErrors` subclass) holding every problem;
    with one problem its message is exactly that problem.
    """

    def __init__(self, error: type[ConfigErrors] = ConfigErrors):
        self.messages: list[str] = []
        self.error = error

    def add(self, message: str) -> None:
        """Record one problem."""
        self.messages.append(message)

    def check(self, ok: bool, message: str) -> bool:
        """Record ``message`` unless ``ok``; return ``ok`` (so dependent checks can be skipped)."""
        if not ok:
            self.add(message)
        return bool(ok)

    def choice(self, name: str, value: object, allowed) -> bool:
        """Check that ``value`` is one of ``allowed``: ``name=value is not one of [...]``."""
        return self.check(value in allowed, f"{name}={value!r} is not one of {list(allowed)}")

    @contextmanager
    def collect(self) -> Iterator[None]:
        """Record the problems of a :class:`ConfigError` raised inside the block, and go on."""
        try:
            yield
        except ConfigError as e:
            self.messages.extend(config_problems(e))

    def __bool__(self) -> bool:
        return bool(self.messages)

    def __len__(self) -> int:
        return len(self.messages)

    def raise_if_any(self) -> None:
        """Raise every recorded problem together (nothing when there is none)."""
        if self.messages:
            raise self.error(self.messages)


class CheckpointError(UserError):
    """A model or checkpoint folder cannot be read, converted or loaded as asked."""


class HFCheckpointError(CheckpointError):
    """A Hugging Face model folder is incomplete or inconsistent (shards, index, dtypes, shapes)."""


class CheckpointFormatError(CheckpointError):
    """A Megatron checkpoint folder is incomplete or not in the torch_dist format."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the model it is loaded into (shapes, vocabulary, layers)."""
