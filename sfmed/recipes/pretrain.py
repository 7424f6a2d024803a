"""Pretraining: next-token prediction on Megatron indexed datasets, the first recipe.

Data: one indexed dataset (``data.prefix``) or a blend (``data.blend``, resolved by
:mod:`sfmed.data.blend`), read through megatron-core's ``BlendedMegatronDatasetBuilder`` +
``GPTDataset`` — their document/sample/shuffle indices make the sample order a pure function of
the seed, the blend and the number of samples, so the run's data position is one number
(``consumed_samples``) and a resume reads exactly the samples not yet seen.

Loss: megatron-core's schedules call :func:`make_forward_step`'s function once per micro-batch
and chunk; :func:`loss_func` returns (sum over tokens, token count) and the schedule runs with
``calculate_per_token_loss=True``, so gradients are the mean over every token of the global
batch — independent of how it is cut into micro-batches and data-parallel ranks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from sfmed.config.pretrain import PretrainConfig
from sfmed.core import megatron_layout as layout
from sfmed.core.errors import ConfigError, ConfigErrors
from sfmed.recipes.base import Recipe, StepReport

log = logging.getLogger(__name__)


# -- loss and forward step (pure tensor code) ------------------------------------------------------


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(summed masked loss, token count, reports) for the schedule.

    Reports: ``lm loss`` = [loss sum, loss tokens], ``tokens`` = [positions in the batch].
    """
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.float()])
    positions = torch.tensor([float(mask.numel())], device=report.device)
    return loss, num_tokens, {"lm loss": report, "tokens": positions}


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_forward_step(device: torch.device):
    """``forward_step(data_iterator, model)`` for megatron's schedules on ``device``."""
    from megatron.core.utils import get_attr_wrapped_model

    from sfmed.core.mcore_compat import get_batch_on_this_cp_rank

    def forward_step(data_iterator, model):
        pre = get_attr_wrapped_model(model, "pre_process")
        post = get_attr_wrapped_model(model, "post_process")
        if not (pre or post):
            # A middle stage: its input arrives from the previous stage via set_input_tensor.
            return model(None, None, None), None
        # With context parallelism each CP rank keeps its (load-balanced) part of the sequence;
        # a no-op at cp=1.
        batch = get_batch_on_this_cp_rank(_to(next(data_iterator), device))
        out = model(
            batch["tokens"] if pre else None,
            batch["position_ids"] if pre else None,
            None,  # causal: the attention kernels build the mask
            labels=batch["labels"] if post else None,
        )
        return out, (partial(loss_func, batch["loss_mask"]) if post else None)

    return forward_step


# -- data ------------------------------------------------------------------------------------------


@dataclass
class PretrainData:
    """The resolved training data: absolute prefixes, blend weights, end-of-document id."""

    prefixes: list[str]
    weights: list[float] | None
    eod_id: int | None


class TokenIds:
    """What ``GPTDatasetConfig.tokenizer`` is asked for when samples are already token ids.

    megatron-core reads only ``vocab_size`` and ``eod`` (and tries ``pad``: absent, so nothing is
    masked as padding — Qwen2's pad id equals its EOD id, which must stay in the loss).
    """

    def __init__(self, vocab_size: int, eod: int | None):
        self.vocab_size = vocab_size
        # Unknown EOD (only the reset/mask options read it, and they require it): an id no data
        # holds, and not megatron's placeholder pad id -1, which it would warn collides with EOD.
        self.eod = -2 if eod is None else eod
        self.unique_identifiers = {"class": "sfmed.TokenIds", "vocab_size": vocab_size}


def _eod_from_tokenizer(path: str, eod_token: str | None) -> int | None:
    from sfmed.data.metadata import tokenizer_files

    kind, files = tokenizer_files(path)
    if kind == "sentencepiece":
        # Read the way preprocessing reads it: a SentencePiece folder (LLaMA, Baichuan) needs no
        # transformers class, and Baichuan's is hub remote code that is not there.
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(files[0]))
        if eod_token and sp.piece_to_id(eod_token) != sp.unk_id():
            return sp.piece_to_id(eod_token)
        return sp.eos_id() if sp.eos_id() >= 0 else None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if eod_token and eod_token in tok.get_vocab():
        return tok.convert_tokens_to_ids(eod_token)
    return tok.eos_token_id


def resolve_data(cfg: PretrainConfig, eod_token: str | None = None) -> PretrainData:
    """Check ``cfg.data`` and resolve it (files exist, blend weights, EOD id); no big reads.

    ``eod_token`` is the model family's end-of-document token, looked up in ``data.tokenizer``
    when neither ``data.eod_id`` nor the dataset's sidecar gives the id.
    """
    d = cfg.data
    if d.prefix is None and not d.blend:
        raise ConfigError(
            "no training data: set data.prefix=<path without .bin/.idx> or data.blend="
            "[{prefix: ..., weight: ...}, ...] (make indexed datasets with launch/preprocess.py)"
        )
    if d.prefix is not None:
        prefix = str(d.prefix)
        if prefix.endswith((".bin", ".idx")):
            raise ConfigError(
                f"data.prefix={prefix} ends in {prefix[-4:]}; give the prefix without the extension"
            )
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not Path(p).is_file()]
        if missing:
            raise ConfigError(
                f"data.prefix={prefix}: {' and '.join(missing)} not found; fix the path or create "
                "the dataset with python launch/preprocess.py"
            )
        prefixes, weights = [os.path.abspath(prefix)], None
    else:
        from sfmed.data.blend import BlendError, resolve_blend

        try:
            prefixes, weights = resolve_blend(
                [dict(e) for e in d.blend],
                tokenizer=d.tokenizer,
                groups=dict(d.groups) if d.groups else None,
                require_metadata=d.require_metadata,
            )
        except BlendError as e:
            raise ConfigError(f"data.blend: {e}") from None
    eod = d.eod_id
    if eod is None:
        from sfmed.data.metadata import read_sidecar

        try:
            meta = read_sidecar(prefixes[0]) or {}
        except ValueError:
            meta = {}
        eod = (meta.get("tokenizer") or {}).get("eod_id")
    if eod is None and d.tokenizer:
        eod = _eod_from_tokenizer(d.tokenizer, eod_token)
    if eod is None and (d.reset_position_ids or d.eod_mask_loss):
        raise ConfigError(
            "data.reset_position_ids / data.eod_mask_loss need the end-of-document id: set "
            "data.eod_id=<id> or data.tokenizer=<tokenizer folder>"
        )
    return PretrainData(prefixes, weights, eod)


def model_tokenizer(cfg: PretrainConfig, ckpt: Path | None) -> str | None:
    """The model's tokenizer: ``data.tokenizer``, else the tokenizer files that travel with the
    init/resume checkpoint (its ``hf/`` side folder); None when neither is known."""
    from sfmed.data.metadata import tokenizer_files

    cands = [cfg.data.tokenizer] if cfg.data.tokenizer else []
    if ckpt is not None:
        cands += [str(ckpt.parent / layout.HF_SIDECAR), str(ckpt / layout.HF_SIDECAR)]
    for cand in cands:
        try:
            tokenizer_files(cand)
        except FileNotFoundError:
            if cand == cfg.data.tokenizer:
                return cand  # the user named it: its own check reports the bad path
            continue
        return cand
    return None


def check_data(
    cfg: PretrainConfig,
    data: PretrainData,
    vocab_size: int,
    tokenizer: str | None,
    eod_token: str | None = None,
) -> None:
    """Refuse data the run cannot train on, naming every problem at once (no big reads except
    one pass over a ``.bin`` that has no sidecar).

    Each prefix must be non-empty, its recorded tokenizer (vocabulary size, hash, EOD id) must be
    the model's (``tokenizer``; ``data.eod_id`` overrides its EOD id) — or, without a sidecar, its
    largest id must fit ``vocab_size`` — and every split the run reads must get documents
    (megatron's ``GPTDataset`` searches forever for a sample in an empty one).
    """
    from sfmed.data.checks import check_prefix, check_splits
    from sfmed.data.indexed import read_index_header
    from sfmed.data.metadata import tokenizer_hash

    d, t = cfg.data, cfg.train
    tok_hash, eod = None, d.eod_id
    if tokenizer is not None:
        try:
            tok_hash = tokenizer_hash(tokenizer)
        except FileNotFoundError as e:
            raise ConfigError(f"data.tokenizer={tokenizer}: {e}") from None
        if eod is None:
            try:
                eod = _eod_from_tokenizer(tokenizer, eod_token)
            except (OSError, ValueError) as e:  # transformers cannot load it: no EOD to compare
                log.warning(
                    "tokenizer %s does not load (%s); its EOD id is not checked", tokenizer, e
                )
    needed = ("train", "valid") if t.eval_interval else ("train",)
    problems: list[str] = []
    for prefix in data.prefixes:
        found = check_prefix(prefix, vocab_size=vocab_size, tokenizer_hash=tok_hash, eod_id=eod)
        if not found:
            docs = read_index_header(prefix)["documents"]
            found = check_splits(docs, d.split, prefix=prefix, needed=needed)
        problems += found
    if problems:
        raise ConfigErrors(problems)


def build_gpt_datasets(cfg: PretrainConfig, plan, data: PretrainData):
    """(train, valid) megatron-core GPT datasets sized for the whole run (call on every rank)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d, t = cfg.data, cfg.train
    train_samples = t.steps * t.global_batch_size
    n_evals = t.steps // t.eval_interval + 1 if t.eval_interval else 0
    valid_samples = n_evals * t.eval_iters * t.global_batch_size if n_evals else None
    cache = Path(d.cache_dir) if d.cache_dir else plan.run_dir / "data_cache"
    gcfg = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=d.seq_length,
        blend=(data.prefixes, data.weights),
        split=",".join(f"{w:g}" for w in d.split_weights),
        path_to_cache=str(cache),
        tokenizer=TokenIds(plan.arch.vocab_size, data.eod_id),
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss,
        # Causal attention needs no mask tensor: the kernels build it (saves s×s per sample).
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    # Splits the run does not read are not built at all — the test split never, the valid split
    # without evaluation — since an empty one would make megatron's GPTDataset search forever.
    # The train split keeps its documents (the ranges do not depend on the others being built).
    m = gcfg.split_matrix
    gcfg.split_matrix = [m[0], m[1] if n_evals else None, None]
    # 0, not None, for a split left unbuilt: megatron asserts size None => no weights, and a
    # weighted blend would trip it; a split whose matrix entry is None is skipped either way.
    sizes = [train_samples, valid_samples if valid_samples else 0, 0]
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, lambda: True, gcfg
    ).build()
    if train_ds is None or len(train_ds) < train_samples:
        raise RuntimeError(
            f"the training split holds {0 if train_ds is None else len(train_ds)} samples but "
            f"{train_samples} are needed; check data.split={d.split!r}"
        )
    return train_ds, (valid_ds if n_evals else None)


# -- the recipe ------------------------------------------------------------------------------------


class PretrainRecipe(Recipe):
    """Continued pretraining: next-token loss over every position (or all but EOD)."""

    kind = "pretrain"
    config_class = PretrainConfig
    reports = {"lm loss": 2, "tokens": 1}

    def seq_length(self) -> int:
        """``data.seq_length``."""
        return self.cfg.data.seq_length

    def resolve(self, plan) -> PretrainData:
        """Check the data settings; resolve the datasets and the EOD id."""
        t, d = self.cfg.train, self.cfg.data
        if t.eval_interval and d.split_weights[1] == 0:
            raise ConfigError(
                f"train.eval_interval={t.eval_interval} but data.split={d.split!r} has no "
                "validation part; use e.g. data.split=98,2,0 or train.eval_interval=0"
            )
        from sfmed.models import family_for

        data = resolve_data(self.cfg, family_for(plan.arch).eod_token)
        ckpt = plan.resume_from or plan.init_from
        tok = model_tokenizer(self.cfg, ckpt)
        check_data(self.cfg, data, plan.arch.vocab_size, tok, family_for(plan.arch).eod_token)
        return data

    def describe(self, plan) -> str:
        """Datasets and EOD id."""
        data = plan.recipe
        return f"pretrain on {len(data.prefixes)} dataset(s), eod={data.eod_id}"

    def build_datasets(self, plan):
        """megatron-core GPT datasets (train, valid)."""
        return build_gpt_datasets(self.cfg, plan, plan.recipe)

    def num_workers(self) -> int:
        """``data.num_workers``."""
        return self.cfg.data.num_workers

    def forward_step(self, trainer):
        """Next-token forward step on the trainer's device."""
        return make_forward_step(trainer.device)

    def summarize(self, totals: dict[str, list[float]]) -> StepReport:
        """Per-token mean loss; every position counts for throughput."""
        loss_sum, count = totals["lm loss"]
        return StepReport(
            loss=loss_sum / max(count, 1.0), loss_tokens=count, tokens=totals["tokens"][0]
        )
