"""Answer backends: transformers (``hf``), vLLM and OpenAI-compatible endpoints."""

from __future__ import annotations

from dataclasses import dataclass

from sfmed.config.eval import EvalConfig
from sfmed.eval.backends.base import Backend, BackendError, Chat, render_plain
from sfmed.eval.chat_formats import format_name
from sfmed.eval.prompts import RAW_PROMPT_PRESETS


@dataclass(frozen=True)
class BackendSpec:
    """Everything that decides which engine answers: two equal specs can share one engine."""

    backend: str
    model: str
    tokenizer: str | None = None
    chat_format: str = "auto"
    scoring: bool = False  # built for log-likelihoods (vLLM: prefix caching off)


def side_spec(cfg: EvalConfig, side: str = "", scoring: bool = False, **over) -> BackendSpec:
    """The spec of side ``''``/``'a'`` (``model=``) or ``'b'`` (``model_b=``) of a run."""
    b = side == "b"
    fmt = format_name(cfg.chat_format_b if b else cfg.chat_format, cfg.use_chat_template)
    if fmt == "auto" and cfg.task == "mcq" and cfg.mcq.prompt.preset in RAW_PROMPT_PRESETS:
        fmt = "plain"  # lm-eval and OpenCompass (base models) feed the prompt raw
    spec = BackendSpec(
        backend=cfg.backend,
        model=cfg.model_b if b else cfg.model,
        tokenizer=cfg.tokenizer_b if b else cfg.tokenizer,
        chat_format=fmt,
        scoring=scoring,
    )
    return BackendSpec(**{**spec.__dict__, **over})


def make_backend(cfg: EvalConfig, spec: BackendSpec) -> Backend:
    """The engine for ``spec`` (an HF folder, or a served model name for openai)."""
    if spec.backend == "hf":
        from sfmed.eval.backends.hf import HFBackend

        return HFBackend(spec.model, cfg.hf, spec.chat_format, tokenizer=spec.tokenizer)
    if spec.backend == "vllm":
        from sfmed.eval.backends.vllm_backend import VLLMBackend

        return VLLMBackend(
            spec.model,
            cfg.vllm,
            spec.chat_format,
            seed=cfg.decoding.seed,
            tokenizer=spec.tokenizer,
            scoring=spec.scoring,
        )
    if spec.backend == "openai":
        from sfmed.eval.backends.openai_api import OpenAIBackend

        return OpenAIBackend(spec.model, cfg.api)
    raise BackendError(f"backend={spec.backend!r} is not one of hf, vllm, openai")


class BackendPool:
    """Holds at most one engine at a time: the same spec reuses it, another spec closes it first.

    One vLLM engine reserves most of a GPU, so the two sides of a pairwise run (or the models of
    a suite) are loaded one after the other, never side by side.
    """

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.spec: BackendSpec | None = None
        self.backend: Backend | None = None
        self.loads = 0  # engines created (tests check that equal sides share one)

    def get(self, spec: BackendSpec) -> Backend:
        """The engine for ``spec``, reusing the current one when the spec is equal."""
        if self.backend is not None and self.spec == spec:
            return self.backend
        self.close()
        self.backend = make_backend(self.cfg, spec)
        self.spec = spec
        self.loads += 1
        return self.backend

    def close(self) -> None:
        """Close the held engine (if any)."""
        if self.backend is not None:
            self.backend.close()
        self.backend, self.spec = None, None


__all__ = [
    "Backend",
    "BackendError",
    "BackendPool",
    "BackendSpec",
    "Chat",
    "make_backend",
    "render_plain",
    "side_spec",
]
