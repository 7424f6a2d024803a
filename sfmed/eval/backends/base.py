"""What every answer source offers: batched chat generation and, where possible, log-likelihoods."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from sfmed.config.eval import DecodingConfig

Chat = list[dict[str, str]]


class BackendError(RuntimeError):
    """A backend cannot be created or cannot do what was asked (the message says what to do)."""


class Backend(abc.ABC):
    """A model that answers chats; implementations: transformers, vLLM, OpenAI-compatible API."""

    name: str = "backend"

    @abc.abstractmethod
    def generate(
        self, chats: Sequence[Chat], decoding: DecodingConfig, desc: str = ""
    ) -> list[str]:
        """One completion per chat (the assistant's next turn), in input order."""

    def loglikelihood(self, requests: Sequence[tuple[Chat, str]]) -> list[float]:
        """Sum of log-probabilities of each continuation string right after its rendered chat."""
        raise BackendError(
            f"backend={self.name} gives no token log-probabilities; use backend=hf or vllm "
            "for mcq.mode=loglik"
        )

    @abc.abstractmethod
    def info(self) -> dict:
        """What produced the answers (model, dtype, chat template use…), for the result JSON."""

    def close(self) -> None:
        """Release the model (GPU memory) when the run ends."""
        return None  # nothing to release for remote endpoints


def render_plain(chat: Chat) -> str:
    """A chat as plain text for base models without a chat template: the turns' contents.

    Earlier turns (few-shot examples or dialogue history) are kept in order so that a base model
    continues the last one.
    """
    return "\n\n".join(m["content"] for m in chat if m["role"] != "system" or m["content"])
