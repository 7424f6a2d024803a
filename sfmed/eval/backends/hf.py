"""The transformers backend: batched generation and log-likelihood scoring on CPU or GPU."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sfmed.config.eval import DecodingConfig, HFConfig
from sfmed.eval.backends.base import Backend, BackendError, Chat, render_plain

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFBackend(Backend):
    """``AutoModelForCausalLM`` + its tokenizer; chats rendered with the tokenizer's template."""

    name = "hf"

    def __init__(self, model_dir: str | Path, cfg: HFConfig, use_chat_template: bool | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise BackendError(
                f"model={path} is not a Hugging Face model folder (no config.json); convert a "
                "Megatron checkpoint with `launch/convert.py to=hf` first"
            )
        self.cfg = cfg
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        )
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"hf.device={cfg.device} but no CUDA device is visible; use cpu")
        dtype = _DTYPES.get(cfg.dtype) or (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32
        )
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        has_template = bool(getattr(self.tok, "chat_template", None))
        if use_chat_template and not has_template:
            raise BackendError(
                f"use_chat_template=true but the tokenizer in {path} has no chat_template; "
                "set use_chat_template=false for a base model"
            )
        self.chat = has_template if use_chat_template is None else use_chat_template
        kw = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
        self.model.to(self.device).eval()
        self.model_dir = str(path)
        self.dtype = str(dtype).removeprefix("torch.")
        logger.info("loaded %s on %s (%s), chat template: %s", path, self.device, dtype, self.chat)

    def info(self) -> dict:
        """Model folder, dtype, batch size and whether the chat template was applied."""
        return {
            "backend": "hf",
            "model": self.model_dir,
            "dtype": self.dtype,
            "batch_size": self.cfg.batch_size,
            "chat_template": self.chat,
        }

    def render(self, chat: Chat) -> str:
        """The exact prompt text the model sees."""
        if self.chat:
            return self.tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return render_plain(chat)

    def _eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = list(ids) if isinstance(ids, list | tuple) else ([ids] if ids is not None else [])
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in ids:
            ids.append(self.tok.eos_token_id)
        return ids

    def generation_config(self, d: DecodingConfig):
        """A fresh ``GenerationConfig`` from ``d`` only (the folder's sampling defaults are not
        used, so that the recorded parameters are the whole story)."""
        from transformers import GenerationConfig

        kw = {
            "max_new_tokens": d.max_new_tokens,
            "do_sample": not d.greedy,
            "repetition_penalty": d.repetition_penalty,
            "eos_token_id": self._eos_ids(),
            "pad_token_id": self.tok.pad_token_id,
        }
        if not d.greedy:
            kw.update(temperature=d.temperature, top_p=d.top_p, top_k=d.top_k or None)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        return GenerationConfig(**kw)

    @torch.inference_mode()
    def generate(
        self, chats: Sequence[Chat], decoding: DecodingConfig, desc: str = ""
    ) -> list[str]:
        """Batched generation, longest prompts first; the seed is reset per batch."""
        texts = [self.render(c) for c in chats]
        gc = self.generation_config(decoding)
        order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
        out: list[str] = [""] * len(texts)
        bs = self.cfg.batch_size
        batches = [order[s : s + bs] for s in range(0, len(order), bs)]
        for b, idx in enumerate(tqdm(batches, desc=desc or "generate", unit="batch")):
            enc = self.tok(
                [texts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                add_special_tokens=not self.chat,
            ).to(self.device)
            torch.manual_seed(decoding.seed + b)
            gen = self.model.generate(**enc, generation_config=gc)
            new = gen[:, enc["input_ids"].shape[1] :]
            for i, text in zip(idx, self.tok.batch_decode(new, skip_special_tokens=True)):
                out[i] = text.strip()
        return out

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[tuple[Chat, str]]) -> list[float]:
        """Sum of log P(continuation tokens | rendered chat), batched with left padding."""
        enc = []
        for chat, cont in requests:
            ctx = self.tok(self.render(chat), add_special_tokens=not self.chat)["input_ids"]
            cont_ids = self.tok(cont, add_special_tokens=False)["input_ids"]
            if not cont_ids:
                raise BackendError(f"continuation {cont!r} encodes to no tokens")
            enc.append((ctx, cont_ids))
        order = sorted(range(len(enc)), key=lambda i: (-len(enc[i][0]) - len(enc[i][1]), i))
        out = [0.0] * len(enc)
        bs = self.cfg.batch_size
        batches = [order[s : s + bs] for s in range(0, len(order), bs)]
        pad = self.tok.pad_token_id
        for idx in tqdm(batches, desc="loglikelihood", unit="batch"):
            seqs = [enc[i][0] + enc[i][1] for i in idx]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, width - len(s) :] = torch.tensor(s)
                mask[r, width - len(s) :] = 1
            # Left padding puts every continuation at the end, so only the last positions'
            # logits are computed (a full-vocabulary logit tensor per position is the memory hog).
            keep = max(len(enc[i][1]) for i in idx) + 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=pos.to(self.device),
                logits_to_keep=keep,
            ).logits.float()
            logp = torch.log_softmax(logits, dim=-1).cpu()
            for r, i in enumerate(idx):
                cont = enc[i][1]
                # logits at position t predict token t+1; the last row predicts nothing.
                rows = logp[r, keep - 1 - len(cont) : keep - 1]
                out[i] = float(rows.gather(-1, torch.tensor(cont)[:, None]).sum())
        return out

    def close(self) -> None:
        """Drop the model and free cached GPU memory."""
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
