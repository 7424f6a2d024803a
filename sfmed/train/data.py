"""Pretraining data: megatron-core GPT datasets over indexed datasets, read in a resumable order.

The datasets come from megatron-core's ``BlendedMegatronDatasetBuilder`` + ``GPTDataset`` (its
document/sample/shuffle indices make the sample order a pure function of the seed, the blend and
the number of samples). A run's data position is one number, ``consumed_samples``: sample ``i``
of step ``k`` is ``k * global_batch_size + i``, so resuming — even at another data-parallel size —
reads exactly the samples not yet seen, in the same order (Megatron-LM's pretraining sampler).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from sfmed.config.pretrain import PretrainConfig
from sfmed.train.plan import TrainPlan

log = logging.getLogger(__name__)


class TokenIds:
    """What ``GPTDatasetConfig.tokenizer`` is asked for when samples are already token ids.

    megatron-core reads only ``vocab_size`` and ``eod`` (and tries ``pad``: absent, so nothing is
    masked as padding — Qwen2's pad id equals its EOD id, which must stay in the loss).
    """

    def __init__(self, vocab_size: int, eod: int | None):
        self.vocab_size = vocab_size
        self.eod = -1 if eod is None else eod
        self.unique_identifiers = {"class": "sfmed.TokenIds", "vocab_size": vocab_size}


def build_datasets(cfg: PretrainConfig, plan: TrainPlan):
    """(train, valid) megatron-core datasets sized for the whole run (call on every rank)."""
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
        blend=(plan.data_prefixes, plan.data_weights),
        split=str(d.split).replace("/", ","),
        path_to_cache=str(cache),
        tokenizer=TokenIds(plan.arch.vocab_size, plan.eod_id),
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss,
        # Causal attention needs no mask tensor: the kernels build it (saves s×s per sample).
        create_attention_mask=False,
        mmap_bin_files=True,
    )
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


class PretrainingSampler:
    """Megatron-LM's pretraining batch sampler: consecutive samples from ``consumed_samples``.

    Each step takes the next ``global_batch_size`` samples; micro-batch ``j`` of data-parallel
    rank ``r`` is the slice ``[r * mbs, (r + 1) * mbs)`` of the j-th ``mbs * dp`` block.
    """

    def __init__(self, total: int, consumed: int, micro_batch_size: int, dp_rank: int, dp: int):
        if consumed > total:
            raise ValueError(f"consumed_samples={consumed} exceeds the dataset's {total} samples")
        self.total, self.consumed = total, consumed
        self.mbs, self.dp_rank, self.dp = micro_batch_size, dp_rank, dp

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.mbs * self.dp)

    def __iter__(self) -> Iterator[list[int]]:
        block = self.mbs * self.dp
        start = self.dp_rank * self.mbs
        for first in range(self.consumed, self.total - block + 1, block):
            yield list(range(first + start, first + start + self.mbs))


def make_loader(dataset, consumed: int, cfg: PretrainConfig, plan: TrainPlan, total: int | None):
    """A DataLoader over ``dataset`` from ``consumed`` for this data-parallel rank."""
    from megatron.core import parallel_state as ps

    sampler = PretrainingSampler(
        total=len(dataset) if total is None else total,
        consumed=consumed,
        micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=ps.get_data_parallel_rank(),
        dp=plan.dp,
    )
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=plan.device == "cuda",
        persistent_workers=workers > 0,
    )


def needs_data(chunk) -> bool:
    """Whether a model chunk reads the batch (first stage: tokens; last stage: labels)."""
    from megatron.core.utils import get_attr_wrapped_model

    return bool(
        get_attr_wrapped_model(chunk, "pre_process")
        or get_attr_wrapped_model(chunk, "post_process")
    )


def chunk_iterators(dataset, consumed: int, cfg, plan, model: list, total=None) -> list:
    """One iterator per model chunk (``None`` for chunks that need no data)."""
    return [
        iter(make_loader(dataset, consumed, cfg, plan, total)) if needs_data(m) else None
        for m in model
    ]
