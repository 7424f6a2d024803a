"""The transformers backend: batched generation and log-likelihood scoring on CPU or GPU."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sfmed.config.eval import (
    DecodingConfig,
    HFConfig,
    check_model_folder,
    check_remote_code,
)
from sfmed.core.dtypes import torch_dtype
from sfmed.eval.backends.base import (
    BackendError,
    Chat,
    LocalBackend,
)

logger = logging.getLogger(__name__)


class HFBackend(LocalBackend):
    """``AutoModelForCausalLM`` + its tokenizer; chats rendered in the chosen chat format."""

    name = "hf"

    def __init__(
        self,
        model_dir: str | Path,
        cfg: HFConfig,
        chat_format: str = "auto",
        tokenizer: str | Path | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        check_model_folder(str(path), str(tokenizer) if tokenizer else None)
        check_remote_code(str(path), str(tokenizer) if tokenizer else None, cfg.trust_remote_code)
        remote = {"trust_remote_code": True} if cfg.trust_remote_code else {}
        tok_dir = Path(tokenizer) if tokenizer else path
        self.cfg = cfg
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        )
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"hf.device={cfg.device} but no CUDA device is visible; use cpu")
        dtype = (
            torch_dtype(cfg.dtype, "hf.dtype")
            if cfg.dtype != "auto"
            else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        )
        self.tok = AutoTokenizer.from_pretrained(tok_dir, **remote)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        self._init_format(chat_format)
        kw = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        kw.update(remote)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
        self.model.to(self.device).eval()
        self.max_len = getattr(self.model.config, "max_position_embeddings", None)
        self.model_dir, self.tokenizer_dir = str(path), str(tok_dir)
        self.dtype = str(dtype).removeprefix("torch.")
        logger.info(
            "loaded %s on %s (%s), chat format: %s", path, self.device, dtype, self.fmt.name
        )

    def info(self) -> dict:
        """Model folder, dtype, batch size, chat format and prompt truncation counts."""
        return {
            "backend": "hf",
            "model": self.model_dir,
            "tokenizer": self.tokenizer_dir,
            "dtype": self.dtype,
            "batch_size": self.cfg.batch_size,
            "chat_format": self.fmt.name,
            "chat_template": self.fmt.name == "template",
            "max_len": self.max_len,
            "truncated": dict(self.truncated),
        }

    def _eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = list(ids) if isinstance(ids, list | tuple) else ([ids] if ids is not None else [])
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in ids:
            ids.append(self.tok.eos_token_id)
        return ids

    def generation_config(self, d: DecodingConfig):
        """A complete ``GenerationConfig`` from ``d`` only.

        Every field starts at transformers' global default, so ``generate`` fills nothing in from
        the folder's ``generation_config.json``: the recorded parameters are the whole story, and
        greedy decoding carries no sampling flags (which transformers would warn about).
        """
        from transformers import GenerationConfig

        kw = dict(GenerationConfig._get_default_generation_params())
        kw.update(
            max_new_tokens=d.max_new_tokens,
            do_sample=not d.greedy,
            repetition_penalty=d.repetition_penalty,
            eos_token_id=self._eos_ids(),
            pad_token_id=self.tok.pad_token_id,
        )
        kw.pop("max_length", None)
        if not d.greedy:
            kw.update(temperature=d.temperature, top_p=d.top_p, top_k=d.top_k)
        return GenerationConfig(**kw)

    @torch.inference_mode()
    def generate(
        self, chats: Sequence[Chat], decoding: DecodingConfig, desc: str = ""
    ) -> list[str]:
        """Batched generation, longest prompts first; the seed is reset per batch."""
        prompts = [self.fit(c, decoding.max_new_tokens) for c in chats]
        gc = self.generation_config(decoding)
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        out: list[str] = [""] * len(prompts)
        bs = self.cfg.batch_size
        batches = [order[s : s + bs] for s in range(0, len(order), bs)]
        pad = self.tok.pad_token_id
        for b, idx in enumerate(tqdm(batches, desc=desc or "generate", unit="batch")):
            ids, mask = _left_pad([prompts[i] for i in idx], pad)
            torch.manual_seed(decoding.seed + b)
            gen = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=gc,
            )
            new = gen[:, ids.shape[1] :]
            for i, text in zip(idx, self.tok.batch_decode(new, skip_special_tokens=True)):
                out[i] = text.strip()
        return out

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[tuple[Chat, str]]) -> list[float]:
        """Sum of log P(continuation tokens | rendered chat), batched with left padding."""
        enc = [self.encode_request(chat, cont) for chat, cont in requests]
        order = sorted(range(len(enc)), key=lambda i: (-len(enc[i][0]) - len(enc[i][1]), i))
        out = [0.0] * len(enc)
        bs = self.cfg.batch_size
        batches = [order[s : s + bs] for s in range(0, len(order), bs)]
        pad = self.tok.pad_token_id
        for idx in tqdm(batches, desc="loglikelihood", unit="batch"):
            ids, mask = _left_pad([enc[i][0] + enc[i][1] for i in idx], pad)
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

    @torch.inference_mode()
    def sequence_logprob(self, requests: Sequence[tuple[Chat, str]]) -> list[tuple[float, int]]:
        """Sum of log P of every token after the first of chat + continuation, and the token
        count, batched with left padding (padding is masked, never scored)."""
        enc = [self.encode_sequence(chat, cont) for chat, cont in requests]
        order = sorted(range(len(enc)), key=lambda i: (-len(enc[i]), i))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(enc)
        bs = self.cfg.batch_size
        batches = [order[s : s + bs] for s in range(0, len(order), bs)]
        for idx in tqdm(batches, desc="sequence loglikelihood", unit="batch"):
            ids, mask = _left_pad([enc[i] for i in idx], self.tok.pad_token_id)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=pos.to(self.device),
            ).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).cpu()
            tok_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            # a token is scored when it and the token before it are real (not padding)
            scored = (mask[:, 1:] * mask[:, :-1]).bool()
            for r, i in enumerate(idx):
                out[i] = (float(tok_lp[r][scored[r]].sum()), len(enc[i]))
        return out

    def close(self) -> None:
        """Drop the model and free cached GPU memory (a second call does nothing)."""
        self.__dict__.pop("model", None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of ``seqs`` padded on the left to the longest."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return ids, mask
