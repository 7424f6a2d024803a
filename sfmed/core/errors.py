"""The one family of errors a user can cause.

Every error whose cause is the user's input or configuration derives from :class:`UserError`.
Its message names the offending value and the fix; the entry points print it once, without a
traceback, and exit 2 (:func:`sfmed.core.cli.run_cli`). Anything else is a bug and keeps its
traceback. This module imports nothing but the standard library, so config schemas can use it
without pulling in torch.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error the user can fix (bad config value, bad input file, occupied output)."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration value cannot be used; the message names the value and the fix."""


class ConfigErrors(ConfigError):
    """Several configuration problems, reported together (one per line)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            body = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{len(self.problems)} problems:\n{body}")


class CheckpointError(UserError):
    """A model or checkpoint folder cannot be read, converted or loaded as asked."""


class HFCheckpointError(CheckpointError):
    """A Hugging Face model folder is incomplete or inconsistent (shards, index, dtypes, shapes)."""


class CheckpointFormatError(CheckpointError):
    """A Megatron checkpoint folder is incomplete or not in the torch_dist format."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the model it is loaded into (shapes, vocabulary, layers)."""
