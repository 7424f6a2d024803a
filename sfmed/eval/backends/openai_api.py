"""OpenAI-compatible endpoints: the ``openai`` answer backend and the client the judge uses."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from sfmed.config.eval import APIConfig, DecodingConfig
from sfmed.eval.backends.base import Backend, BackendError, Chat

logger = logging.getLogger(__name__)


def make_client(api: APIConfig, what: str = "api"):
    """An ``openai.OpenAI`` client for ``api`` (base URL from config or ``$OPENAI_BASE_URL``).

    The key comes from the environment variable ``api.api_key_env``; a self-hosted endpoint
    (explicit base URL) may run without one.
    """
    from openai import OpenAI

    base_url = api.base_url or os.environ.get("OPENAI_BASE_URL")
    key = os.environ.get(api.api_key_env)
    if not key:
        if not base_url:
            raise BackendError(
                f"{what}: no API key in ${api.api_key_env} and no base URL; export "
                f"{api.api_key_env}=... or set {what}.base_url= for a self-hosted endpoint"
            )
        key = "EMPTY"  # vLLM/SGLang servers accept any key
    return OpenAI(base_url=base_url, api_key=key, timeout=api.timeout, max_retries=api.max_retries)


def parallel_map(fn: Callable, items: Sequence, concurrency: int, desc: str) -> list:
    """``[fn(x) for x in items]`` on ``concurrency`` threads, in input order, with a progress bar."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit="req"))


class OpenAIBackend(Backend):
    """Answers from a served model through ``/v1/chat/completions``."""

    name = "openai"

    def __init__(self, model_name: str, api: APIConfig):
        self.client = make_client(api, "api")
        self.model_name, self.api = model_name, api

    def info(self) -> dict:
        """Served model name and base URL (never the key)."""
        return {
            "backend": "openai",
            "model": self.model_name,
            "base_url": str(self.client.base_url),
            "chat_template": "server-side",
        }

    def generate(
        self, chats: Sequence[Chat], decoding: DecodingConfig, desc: str = ""
    ) -> list[str]:
        """One chat completion per chat; ``seed`` is sent so servers that honour it repeat."""
        d = decoding

        def one(i_chat):
            i, chat = i_chat
            kw = {} if d.greedy else {"top_p": d.top_p}
            r = self.client.chat.completions.create(
                model=self.model_name,
                messages=chat,
                temperature=d.temperature,
                max_tokens=d.max_new_tokens,
                seed=d.seed + i,
                **kw,
            )
            return (r.choices[0].message.content or "").strip()

        return parallel_map(one, list(enumerate(chats)), self.api.concurrency, desc or "generate")
