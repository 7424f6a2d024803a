"""The vLLM backend (imported at run time; vLLM is an optional install on CUDA machines).

One engine holds most of the GPU's memory (``vllm.gpu_memory_utilization``), so a run never has
two: :meth:`VLLMBackend.close` shuts the engine down and frees its memory before the next model
loads, and a pairwise run whose two sides are the same model reuses one engine
(:class:`sfmed.eval.tasks.common.RunContext`). Log-likelihood scoring builds its engine with
prefix caching off: prompt log-probabilities need every prompt position computed, which older
vLLM releases refuse with a cached prefix and newer ones have returned order-dependent values for.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path

from sfmed.config.eval import DecodingConfig, VLLMConfig, check_model_folder
from sfmed.eval.backends.base import (
    BackendError,
    Chat,
    LocalBackend,
)

logger = logging.getLogger(__name__)


class VLLMBackend(LocalBackend):
    """``vllm.LLM`` on an HF folder; same prompts (chat format) as the transformers backend."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        cfg: VLLMConfig,
        chat_format: str = "auto",
        seed: int = 1234,
        tokenizer: str | Path | None = None,
        scoring: bool = False,
    ):
        try:
            import vllm
        except ImportError as e:
            raise BackendError(
                f"backend=vllm needs vLLM ({e}); install it on a CUDA machine with "
                "`pip install 'sfmed[vllm]'`, or use backend=hf"
            ) from None
        path = Path(model_dir)
        check_model_folder(str(path), str(tokenizer) if tokenizer else None)
        tok_dir = Path(tokenizer) if tokenizer else path
        kw = {"max_model_len": cfg.max_model_len} if cfg.max_model_len else {}
        if tokenizer:
            kw["tokenizer"] = str(tok_dir)
        self.scoring = scoring
        self.llm = vllm.LLM(
            model=str(path),
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            dtype=cfg.dtype,
            seed=seed,
            # prompt log-probabilities must not come from a cached prefix (see module docstring)
            enable_prefix_caching=not scoring,
            **kw,
        )
        self._vllm = vllm
        self.tok = self.llm.get_tokenizer()
        self._init_format(chat_format)
        self.max_len = cfg.max_model_len or _engine_max_len(self.llm)
        self.model_dir, self.tokenizer_dir, self.cfg = str(path), str(tok_dir), cfg

    def info(self) -> dict:
        """Model folder, vLLM version, parallel settings, chat format and truncation counts."""
        return {
            "backend": "vllm",
            "model": self.model_dir,
            "tokenizer": self.tokenizer_dir,
            "vllm_version": getattr(self._vllm, "__version__", "?"),
            "tensor_parallel_size": self.cfg.tensor_parallel_size,
            "dtype": self.cfg.dtype,
            "prefix_caching": not self.scoring,
            "chat_format": self.fmt.name,
            "chat_template": self.fmt.name == "template",
            "max_len": self.max_len,
            "truncated": dict(self.truncated),
        }

    def generate(
        self, chats: Sequence[Chat], decoding: DecodingConfig, desc: str = ""
    ) -> list[str]:
        """All prompts in one vLLM call (its scheduler batches); seeded per request."""
        d = decoding
        params = [
            self._vllm.SamplingParams(
                temperature=d.temperature,
                top_p=d.top_p,
                top_k=d.top_k if d.top_k > 0 else -1,
                repetition_penalty=d.repetition_penalty,
                max_tokens=d.max_new_tokens,
                seed=d.seed + i,
            )
            for i in range(len(chats))
        ]
        prompts = [{"prompt_token_ids": self.fit(c, d.max_new_tokens)} for c in chats]
        outs = self.llm.generate(prompts, params, use_tqdm=True)
        return [o.outputs[0].text.strip() for o in outs]

    def loglikelihood(self, requests: Sequence[tuple[Chat, str]]) -> list[float]:
        """Prompt log-probabilities of context+continuation tokens, summed over the continuation."""
        if not self.scoring:
            raise BackendError(
                "this vLLM engine was built for generation (prefix caching on); log-likelihood "
                "scoring needs one built with scoring=True"
            )
        prompts, spans = [], []
        for chat, cont in requests:
            ctx, cont_ids = self.encode_request(chat, cont)
            prompts.append({"prompt_token_ids": ctx + cont_ids})
            spans.append((len(ctx), cont_ids))
        sp = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
        outs = self.llm.generate(prompts, sp, use_tqdm=True)
        res = []
        for o, (start, cont_ids) in zip(outs, spans):
            lp = o.prompt_logprobs
            res.append(sum(lp[start + j][t].logprob for j, t in enumerate(cont_ids)))
        return res

    def sequence_logprob(self, requests: Sequence[tuple[Chat, str]]) -> list[tuple[float, int]]:
        """Prompt log-probabilities of every token after the first, summed, and the token count."""
        if not self.scoring:
            raise BackendError(
                "this vLLM engine was built for generation (prefix caching on); log-likelihood "
                "scoring needs one built with scoring=True"
            )
        prompts = [{"prompt_token_ids": self.encode_sequence(c, x)} for c, x in requests]
        sp = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
        outs = self.llm.generate(prompts, sp, use_tqdm=True)
        res = []
        for o, p in zip(outs, prompts):
            ids = p["prompt_token_ids"]
            lp = o.prompt_logprobs  # entry 0 (the first token) is None: nothing predicts it
            res.append((sum(lp[j][ids[j]].logprob for j in range(1, len(ids))), len(ids)))
        return res

    def close(self) -> None:
        """Shut the engine down and free its GPU memory, so another model can load next."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()  # V1 engine: stops the engine-core process that holds the weights
        del llm, engine, core
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:
            cleanup_dist_env_and_memory = None
        gc.collect()
        if cleanup_dist_env_and_memory is not None:
            cleanup_dist_env_and_memory()
        logger.info("vLLM engine for %s shut down", self.model_dir)


def _engine_max_len(llm) -> int | None:
    """The engine's context length (``model_config.max_model_len``), when it exposes it."""
    try:
        return int(llm.llm_engine.model_config.max_model_len)
    except (AttributeError, TypeError, ValueError):
        return None
