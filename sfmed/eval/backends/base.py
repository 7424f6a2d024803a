"""What every answer source offers: batched chat generation and, where possible, log-likelihoods.

Local backends (transformers, vLLM) share :class:`LocalBackend`: the chat format, the joint
encoding of context + continuation for log-likelihoods, and the left truncation of over-long
prompts.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence

from sfmed.config.eval import DecodingConfig
from sfmed.core.errors import UserError
from sfmed.eval.chat_formats import Chat, render_plain, resolve_chat_format

logger = logging.getLogger(__name__)

__all__ = ["Backend", "BackendError", "Chat", "LocalBackend", "encode_pair", "render_plain"]


class BackendError(UserError, RuntimeError):
    """A backend cannot be created or cannot do what was asked (the message says what to do)."""


def encode_pair(
    tok, context: str, continuation: str, add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` as they occur in the joint text.

    The two strings are encoded together and the continuation is what follows the context's own
    token count, so that a SentencePiece tokenizer scores the token that really follows the prompt
    (``答案：A`` ends in ``A``, while ``A`` alone is ``▁A``). Trailing whitespace of the context is
    moved into the continuation first, as lm-evaluation-harness's ``_encode_pair`` does.
    """
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = tok(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=add_special_tokens)["input_ids"])
    cont = whole[n_ctx:]
    if not cont:
        raise BackendError(
            f"continuation {continuation!r} adds no tokens after its context (the tokenizer "
            "merges it into the prompt's last token); choose another mcq.prompt continuation"
        )
    return whole[:n_ctx], cont


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

    def sequence_logprob(self, requests: Sequence[tuple[Chat, str]]) -> list[tuple[float, int]]:
        """``(sum of log P of every token after the first, token count)`` of each rendered chat
        followed by its continuation, the text tokenized as one string (OpenCompass's
        ``get_ppl``)."""
        raise BackendError(
            f"backend={self.name} gives no token log-probabilities; use backend=hf or vllm "
            "for mcq.mode=loglik"
        )

    @abc.abstractmethod
    def info(self) -> dict:
        """What produced the answers (model, dtype, chat format…), for the result JSON."""

    def close(self) -> None:
        """Release the model (GPU memory) when the run ends."""
        return None  # nothing to release for remote endpoints


class LocalBackend(Backend):
    """A model run here with its tokenizer: chat format, joint encoding, prompt truncation.

    Subclasses set ``tok``, ``fmt`` (:class:`~sfmed.eval.chat_formats.ChatFormat`) and
    ``max_len`` (the model's context length in tokens).
    """

    tok = None
    fmt = None
    max_len: int | None = None

    def _init_format(self, chat_format: str) -> None:
        try:
            self.fmt = resolve_chat_format(chat_format, self.tok)
        except UserError as e:
            raise BackendError(str(e)) from None
        self.truncated = {"prompts": 0, "turns_dropped": 0, "tokens_cut": 0}

    def render(self, chat: Chat) -> str:
        """The exact prompt text the model sees."""
        return self.fmt.render(chat, self.tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (special tokens as the chat format wants)."""
        return self.tok(text, add_special_tokens=self.fmt.add_special_tokens)["input_ids"]

    def fit(self, chat: Chat, room: int) -> list[int]:
        """Prompt ids of ``chat`` leaving ``room`` tokens free in the context window.

        An over-long prompt loses its oldest dialogue turns first (whole user/assistant pairs,
        the system prompt and the last question kept); if the last turn alone is still too long,
        its oldest tokens are cut. Both are counted in ``truncated`` (recorded in ``info()``).
        """
        ids = self.encode(self.render(chat))
        if self.max_len is None or len(ids) + room <= self.max_len:
            return ids
        budget = max(1, self.max_len - room)
        self.truncated["prompts"] += 1
        chat = list(chat)
        head = [m for m in chat[:1] if m["role"] == "system"]
        body = chat[len(head) :]
        while len(ids) > budget and len(body) > 1:
            # drop the oldest turn, and the assistant reply that answered it
            drop = 2 if len(body) > 2 and body[1]["role"] == "assistant" else 1
            body = body[drop:]
            self.truncated["turns_dropped"] += drop
            ids = self.encode(self.render(head + body))
        if len(ids) > budget:
            self.truncated["tokens_cut"] += len(ids) - budget
            ids = ids[-budget:]
        return ids

    def encode_sequence(self, chat: Chat, continuation: str) -> list[int]:
        """Ids of the rendered chat + continuation as one text, cut from the left (counted in
        ``truncated``) when longer than the context window."""
        ids = self.encode(self.render(chat) + continuation)
        if self.max_len is not None and len(ids) > self.max_len:
            self.truncated["prompts"] += 1
            self.truncated["tokens_cut"] += len(ids) - self.max_len
            ids = ids[-self.max_len :]
        return ids

    def encode_request(self, chat: Chat, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids for a log-likelihood request, the context cut from the
        left (as lm-evaluation-harness does) when both do not fit the context window."""
        ctx, cont = encode_pair(
            self.tok, self.render(chat), continuation, self.fmt.add_special_tokens
        )
        if self.max_len is not None and len(ctx) + len(cont) > self.max_len:
            keep = max(1, self.max_len - len(cont))
            self.truncated["prompts"] += 1
            self.truncated["tokens_cut"] += len(ctx) - keep
            ctx = ctx[-keep:]
        return ctx, cont
