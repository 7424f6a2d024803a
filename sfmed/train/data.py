"""Reading a recipe's dataset in a resumable order, for every recipe.

A recipe's dataset is map-style with a fixed sample order (e.g. megatron-core's ``GPTDataset``,
whose order is a pure function of the seed, the blend and the number of samples). A run's data
position is then one number, ``consumed_samples``: sample ``i`` of step ``k`` is
``k * global_batch_size + i``, so resuming — even at another data-parallel size — reads exactly
the samples not yet seen, in the same order (Megatron-LM's pretraining sampler).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sfmed.config.run import RunConfig
    from sfmed.train.plan import TrainPlan

log = logging.getLogger(__name__)


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


def make_loader(
    dataset, consumed: int, cfg: RunConfig, plan: TrainPlan, total: int | None, num_workers: int = 0
):
    """A DataLoader over ``dataset`` from ``consumed`` for this data-parallel rank."""
    from megatron.core import parallel_state as ps

    sampler = PretrainingSampler(
        total=len(dataset) if total is None else total,
        consumed=consumed,
        micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=ps.get_data_parallel_rank(),
        dp=plan.dp,
    )
    workers = num_workers
    return SignalSafeLoader(
        dataset,
        exit_signals=list(cfg.train.exit_signals),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=plan.device == "cuda",
        persistent_workers=workers > 0,
        # Workers ignore the signals the trainer handles (see ignore_exit_signals).
        worker_init_fn=partial(_worker_init, list(cfg.train.exit_signals)) if workers else None,
    )


def _signals(names: list[str]) -> set:
    import signal

    return {getattr(signal, n) for n in [*names, "SIGINT"]}


def _worker_init(exit_signals: list[str], worker_id: int) -> None:
    import signal

    from sfmed.train.loop import ignore_exit_signals

    ignore_exit_signals(exit_signals)
    # Blocked since the fork (SignalSafeLoader); a signal that arrived meanwhile is now discarded.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _signals(exit_signals))


class SignalSafeLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes start with the exit signals blocked.

    A worker is forked with torch's own SIGTERM handler (which dies unless the signal comes
    from its parent) and only ignores the exit signals once ``worker_init_fn`` has run. torchrun
    signals each rank's whole process group, so a SIGTERM in that window killed the worker and
    the rank failed instead of saving. Workers inherit the blocked mask; ``_worker_init``
    unblocks it after installing ``SIG_IGN``. The rank still gets the signal: it is delivered
    when the mask is restored, right after the workers are started.
    """

    def __init__(self, *args, exit_signals: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.exit_signals = list(exit_signals)

    def __iter__(self):
        import signal

        if not self.num_workers:
            return super().__iter__()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _signals(self.exit_signals))
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def needs_data(chunk) -> bool:
    """Whether a model chunk reads the batch (first stage: tokens; last stage: labels)."""
    from megatron.core.utils import get_attr_wrapped_model

    return bool(
        get_attr_wrapped_model(chunk, "pre_process")
        or get_attr_wrapped_model(chunk, "post_process")
    )


def chunk_iterators(
    dataset, consumed: int, cfg, plan, model: list, total=None, num_workers: int = 0
) -> list:
    """One iterator per model chunk (``None`` for chunks that need no data)."""
    return [
        iter(make_loader(dataset, consumed, cfg, plan, total, num_workers))
        if needs_data(m)
        else None
        for m in model
    ]
