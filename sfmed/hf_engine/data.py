"""The HF engine's view of the SFT data: the sharded engine's samples, in its order, as TRL rows.

The samples come from :class:`sfmed.recipes.sft.SFTSamples` (the same resolution, split, blend
and seeded order as ``engine=mcore``: step k of both engines reads the same samples). A row is
what TRL's padding-free collator (``DataCollatorForLanguageModeling(padding_free=True)``) takes:
``input_ids`` (the sample's real tokens, no padding), ``labels`` (the token itself where it is a
supervised target, -100 elsewhere; the model shifts them) and ``seq_lengths`` (the conversations
of a packed sample). The collator flattens a micro-batch into one row with position ids
restarting per conversation, which transformers turns into a block-diagonal causal mask
(eager/SDPA) or varlen boundaries (flash attention): conversations never attend to each other
and no label crosses a boundary.
"""

from __future__ import annotations

import os

import numpy as np

IGNORE_INDEX = -100


def hf_row(item: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """One ``SFTSamples`` item (padded to ``seq_length``, ``real`` marking its tokens) as a TRL
    row.

    The item's labels are shifted (``labels[t]`` is the target predicted at ``t``, counted where
    ``loss_mask[t]``); transformers' causal-LM loss shifts again, so the row carries each target
    at its own position: ``labels[t + 1] = tokens[t + 1]`` where ``loss_mask[t]`` is set.
    """
    n = int(item["real"].sum())
    tokens = np.asarray(item["tokens"][:n], np.int64)
    keep = np.asarray(item["loss_mask"][: n - 1]) > 0
    labels = np.full(n, IGNORE_INDEX, np.int64)
    labels[1:][keep] = np.asarray(item["labels"][: n - 1])[keep]
    starts = np.flatnonzero(np.asarray(item["position_ids"][:n]) == 0)
    return {
        "input_ids": tokens.tolist(),
        "labels": labels.tolist(),
        "seq_lengths": np.diff(np.append(starts, n)).tolist(),
    }


def _rows(samples):
    for i in range(len(samples)):
        yield hf_row(samples[i])


def ordered_rows(samples, cache_dir: str | os.PathLike):
    """A ``datasets.Dataset`` (what TRL's SFTTrainer takes) of the rows of ``samples`` (an
    :class:`~sfmed.recipes.sft.SFTSamples`), in its order. The rows are written once as Arrow
    files under ``cache_dir`` (reused while the data, split, order and length are the same)."""
    import datasets as hfds

    features = hfds.Features(
        {
            "input_ids": hfds.List(hfds.Value("int32")),
            "labels": hfds.List(hfds.Value("int32")),
            "seq_lengths": hfds.List(hfds.Value("int32")),
        }
    )
    return hfds.Dataset.from_generator(
        _rows, features=features, cache_dir=os.fspath(cache_dir), gen_kwargs={"samples": samples}
    )
