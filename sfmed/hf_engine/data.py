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


def train_parts(sizes: Sequence[int], split: Sequence[float], seed: int) -> list[np.ndarray]:
    """Per dataset, its training samples: a seeded permutation cut by ``split`` (train, valid,
    test proportions), the partition the sharded engine uses."""
    total = float(sum(split))
    parts = []
    for k, n in enumerate(sizes):
        perm = np.random.default_rng([seed, k, 2**31 - 1]).permutation(n)
        n_train = n if split[1] == 0 and split[2] == 0 else int(round(n * split[0] / total))
        parts.append(perm[: max(1, min(n_train, n))])
    return parts


def sample_order(
    parts: Sequence[np.ndarray], weights: Sequence[float], n: int, seed: int
) -> np.ndarray:
    """``n`` (dataset, sample) pairs: draws in proportion to ``weights`` and, within a dataset,
    its training ``parts`` in a seeded permutation per epoch (a dataset smaller than its share
    is repeated, reshuffled). The same order as the sharded engine's: megatron-core's greedy
    blending (each draw goes to the dataset furthest below its share)."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    counts = np.zeros(len(parts), np.int64)
    out = np.empty((n, 2), np.int64)
    perms: dict[tuple[int, int], np.ndarray] = {}
    for i in range(n):
        k = int(np.argmax(w * (i + 1) - counts))
        nth = int(counts[k])
        counts[k] += 1
        part = parts[k]
        epoch = nth // len(part)
        if (k, epoch) not in perms:
            perms[(k, epoch)] = part[np.random.default_rng([seed, k, epoch]).permutation(len(part))]
        out[i] = (k, perms[(k, epoch)][nth % len(part)])
    return out


def _rows(prefixes: list[str], order: np.ndarray):
    datasets = [SFTDataset(p) for p in prefixes]
    for d, s in order:
        yield hf_row(datasets[int(d)][int(s)])


def ordered_rows(
    prefixes: Sequence[str],
    order: np.ndarray,
    cache_dir: str | os.PathLike,
):
    """A ``datasets.Dataset`` (what TRL's SFTTrainer takes) of the rows of ``order``.

    ``order`` holds (dataset, sample) pairs (:func:`sample_order`). The rows are written once as
    Arrow files under ``cache_dir`` (reused while the prefixes and the order are the same).
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
            "order": np.asarray(order, np.int64),
        },
    )
