"""Answer backends: transformers (``hf``), vLLM and OpenAI-compatible endpoints."""

from __future__ import annotations

from sfmed.config.eval import EvalConfig
from sfmed.eval.backends.base import Backend, BackendError, Chat, render_plain


def make_backend(cfg: EvalConfig, model: str) -> Backend:
    """The backend ``cfg.backend`` for ``model`` (an HF folder, or a served name for openai)."""
    if cfg.backend == "hf":
        from sfmed.eval.backends.hf import HFBackend

        return HFBackend(model, cfg.hf, cfg.use_chat_template)
    if cfg.backend == "vllm":
        from sfmed.eval.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model, cfg.vllm, cfg.use_chat_template, seed=cfg.decoding.seed)
    if cfg.backend == "openai":
        from sfmed.eval.backends.openai_api import OpenAIBackend

        return OpenAIBackend(model, cfg.api)
    raise BackendError(f"backend={cfg.backend!r} is not one of hf, vllm, openai")


__all__ = ["Backend", "BackendError", "Chat", "make_backend", "render_plain"]
