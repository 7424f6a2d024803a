"""The vLLM backend (imported at run time; vLLM is an optional install on CUDA machines)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from sfmed.config.eval import DecodingConfig, VLLMConfig
from sfmed.eval.backends.base import Backend, BackendError, Chat, render_plain

logger = logging.getLogger(__name__)


class VLLMBackend(Backend):
    """``vllm.LLM`` on an HF folder; same prompts (chat template) as the transformers backend."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        cfg: VLLMConfig,
        use_chat_template: bool | None = None,
        seed: int = 1234,
    ):
        try:
            import vllm
        except ImportError as e:
            raise BackendError(
                f"backend=vllm needs vLLM ({e}); install it on a CUDA machine with "
                "`pip install 'sfmed[vllm]'`, or use backend=hf"
            ) from None
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise BackendError(f"model={path} is not a Hugging Face model folder (no config.json)")
        kw = {"max_model_len": cfg.max_model_len} if cfg.max_model_len else {}
        self.llm = vllm.LLM(
            model=str(path),
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            dtype=cfg.dtype,
            seed=seed,
            **kw,
        )
        self._vllm = vllm
        self.tok = self.llm.get_tokenizer()
        has_template = bool(getattr(self.tok, "chat_template", None))
        if use_chat_template and not has_template:
            raise BackendError(f"use_chat_template=true but {path} has no chat_template")
        self.chat = has_template if use_chat_template is None else use_chat_template
        self.model_dir, self.cfg = str(path), cfg

    def info(self) -> dict:
        """Model folder, vLLM version and parallel settings."""
        return {
            "backend": "vllm",
            "model": self.model_dir,
            "vllm_version": getattr(self._vllm, "__version__", "?"),
            "tensor_parallel_size": self.cfg.tensor_parallel_size,
            "dtype": self.cfg.dtype,
            "chat_template": self.chat,
        }

    def render(self, chat: Chat) -> str:
        """The exact prompt text the model sees."""
        if self.chat:
            return self.tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return render_plain(chat)

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
        prompts = [self.render(c) for c in chats]
        outs = self.llm.generate(prompts, params, use_tqdm=True)
        return [o.outputs[0].text.strip() for o in outs]

    def loglikelihood(self, requests: Sequence[tuple[Chat, str]]) -> list[float]:
        """Prompt log-probabilities of context+continuation tokens, summed over the continuation."""
        prompts, spans = [], []
        for chat, cont in requests:
            ctx = self.tok(self.render(chat), add_special_tokens=not self.chat)["input_ids"]
            cont_ids = self.tok(cont, add_special_tokens=False)["input_ids"]
            prompts.append({"prompt_token_ids": ctx + cont_ids})
            spans.append((len(ctx), cont_ids))
        sp = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
        outs = self.llm.generate(prompts, sp, use_tqdm=True)
        res = []
        for o, (start, cont_ids) in zip(outs, spans):
            lp = o.prompt_logprobs
            res.append(sum(lp[start + j][t].logprob for j, t in enumerate(cont_ids)))
        return res
