"""The HF engine's view of the SFT datasets: the same samples, in a fixed order, as TRL rows.

A row is what TRL's padding-free collator (``DataCollatorForLanguageModeling(padding_free=True)``)
takes: ``input_ids``, ``labels`` (the token itself where it is a supervised target, -100
elsewhere; the model shifts them) and ``seq_lengths`` (the conversations of a packed sample).
The collator flattens a micro-batch into one row with position ids restarting per conversation,
which transformers turns into a block-diagonal causal mask (eager/SDPA) or varlen boundaries
(flash attention), so conversations never attend to each other and no label crosses a boundary.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from sfmed.data.chat.store import IGNORE_INDEX, SFTDataset


def hf_row(sample: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """One :class:`SFTDataset` sample as a TRL row (unshifted labels, conversation lengths).

    The reader's labels are already shifted (``labels[t]`` is the target predicted at ``t``);
    transformers' causal-LM loss shifts again, so the row carries the target at its own
    position: ``labels[t + 1] = tokens[t + 1]`` where ``loss_mask[t]`` is set.
    """
    tokens = sample["tokens"]
    keep = sample["loss_mask"][:-1] > 0
    labels = np.full_like(tokens, IGNORE_INDEX)
    labels[1:][keep] = sample["labels"][:-1][keep]
    return {
        "input_ids": tokens.tolist(),
        "labels": labels.tolist(),
        "seq_lengths": sample["seq_lengths"].tolist(),
    }


def blend_order(sizes: Sequence[int], weights: Sequence[float], n: int, seed: int) -> np.ndarray:
    """``n`` (dataset, sample) pairs drawn from datasets of ``sizes`` in proportion to ``weights``.

    Datasets are interleaved as megatron-core's blended dataset does (each draw goes to the
    dataset furthest behind its share); within a dataset the samples come in a seeded
    permutation, a new one per epoch, so a dataset smaller than its share is repeated.
    """
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    counts = np.zeros(len(sizes), np.int64)
    which = np.empty(n, np.int64)
    for i in range(n):
        d = int(np.argmax(w * max(i, 1) - counts))
        which[i] = d
        counts[d] += 1
    out = np.empty((n, 2), np.int64)
    out[:, 0] = which
    for d, size in enumerate(sizes):
        idx = np.flatnonzero(which == d)
        epochs = -(-idx.shape[0] // size) if idx.shape[0] else 0
        perm = np.concatenate(
            [np.random.default_rng([seed, d, e]).permutation(size) for e in range(epochs)]
            or [np.zeros(0, np.int64)]
        )
        out[idx, 1] = perm[: idx.shape[0]]
    return out


def _rows(prefixes: list[str], keeps: list[list[int] | None], order: np.ndarray):
    datasets = [SFTDataset(p) for p in prefixes]
    for d, s in order:
        keep = keeps[int(d)]
        yield hf_row(datasets[int(d)][int(s) if keep is None else keep[int(s)]])


def ordered_rows(
    prefixes: Sequence[str],
    keeps: Sequence[Sequence[int] | None],
    order: np.ndarray,
    cache_dir: str | os.PathLike,
):
    """A ``datasets.Dataset`` (what TRL's SFTTrainer takes) of the rows of ``order``.

    ``order`` holds (dataset, index) pairs; ``keeps[d]`` maps an index of dataset ``d`` to its
    sample (its training split), or is None for all samples. The rows are written once as Arrow
    files under ``cache_dir`` (reused while prefixes, splits and order are the same).
    """
    import datasets as hfds

    features = hfds.Features(
        {
            "input_ids": hfds.List(hfds.Value("int32")),
            "labels": hfds.List(hfds.Value("int32")),
            "seq_lengths": hfds.List(hfds.Value("int32")),
        }
    )
    return hfds.Dataset.from_generator(
        _rows,
        features=features,
        cache_dir=os.fspath(cache_dir),
        gen_kwargs={
            "prefixes": [os.fspath(p) for p in prefixes],
            "keeps": [None if k is None else list(map(int, k)) for k in keeps],
            "order": np.asarray(order, np.int64),
        },
    )
