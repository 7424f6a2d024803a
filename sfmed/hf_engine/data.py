"""The HF engines' view of the chat data: the sharded engine's samples, in its order, as TRL rows.

SFT (below) and preference pairs (:func:`pair_row`, :func:`ordered_pair_rows`, for TRL's
``DPOTrainer``).

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


# --------------------------------------------------------------------------- preference pairs
PAIR_FEATURES = ("prompt_ids", "chosen_ids", "rejected_ids")


def _targets(item: dict[str, np.ndarray]) -> np.ndarray:
    """Per token: whether it is a supervised target (the stored mask, unshifted). The item's
    ``loss_mask[t]`` marks the target ``t + 1``; no target crosses a sequence boundary."""
    lm = np.asarray(item["loss_mask"]) > 0
    tgt = np.zeros(lm.shape[0], bool)
    tgt[1:] = lm[:-1]
    return tgt


def pair_row(item: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """One preference sample (a :class:`~sfmed.data.chat.store.PreferenceDataset` item, or a
    trainer's padded one with ``real`` marking its tokens) as the row TRL's ``DataCollatorForPreference`` takes: ``prompt_ids`` (the tokens
    both sides share up to the first supervised token), ``chosen_ids`` / ``rejected_ids`` (each
    side's supervised answer, ``<|im_end|>`` included).

    TRL scores every completion token, so a side's supervised span must be one run of tokens;
    what follows it (the unsupervised ``\\n`` after ``<|im_end|>``) is dropped: under a causal
    mask it changes no earlier log-prob. Raises ``ValueError`` for a sample that is not exactly
    one pair (packed data) or whose sides do not share the prompt.
    """
    # Sequence boundaries from the position ids (they restart per sequence), over the real
    # tokens: the same for a stored sample and a trainer's padded one.
    n = int(np.asarray(item["real"]).sum()) if "real" in item else len(item["tokens"])
    tokens = np.asarray(item["tokens"][:n], np.int64)
    starts = np.flatnonzero(np.asarray(item["position_ids"][:n]) == 0)
    cu = np.append(starts, n)
    tgt = _targets(item)[:n]
    sides = [(a, b) for a, b in zip(cu[:-1], cu[1:], strict=True) if tgt[a:b].any()]
    if len(sides) != 2:
        raise ValueError(
            f"a preference sample holds {len(sides) // 2} pairs; engine=hf trains one pair per "
            "sample (TRL's DPOTrainer): preprocess with chat.pack=false, or use engine=mcore "
            "for packed pairs"
        )
    out: dict[str, list[int]] = {}
    prompts = []
    for name, (a, b) in zip(("chosen_ids", "rejected_ids"), sides, strict=True):
        x, t = tokens[a:b], np.flatnonzero(tgt[a:b])
        s, e = int(t[0]), int(t[-1]) + 1
        if t.size != e - s:
            raise ValueError(
                f"the {name[:-4]} answer's supervised tokens are not one span (mask {tgt[a:b]})"
            )
        prompts.append(x[:s])
        out[name] = x[s:e].tolist()
    if not np.array_equal(prompts[0], prompts[1]):
        raise ValueError("chosen and rejected of a pair do not share the same prompt tokens")
    return {"prompt_ids": prompts[0].tolist(), **out}


def _pair_rows(samples):
    # A trainer's samples give the stored sample itself (unpadded) as ``raw``.
    get = getattr(samples, "raw", samples.__getitem__)
    for i in range(len(samples)):
        yield pair_row(get(i))


def ordered_pair_rows(samples, cache_dir: str | os.PathLike):
    """A ``datasets.Dataset`` of the :func:`pair_row` of every sample of ``samples`` (e.g. a
    :class:`~sfmed.recipes.dpo.PreferenceSamples`), in its order (what TRL's ``DPOTrainer`` takes, already tokenized); cached under ``cache_dir``."""
    import datasets as hfds

    features = hfds.Features({k: hfds.List(hfds.Value("int32")) for k in PAIR_FEATURES})
    return hfds.Dataset.from_generator(
        _pair_rows,
        features=features,
        cache_dir=os.fspath(cache_dir),
        gen_kwargs={"samples": samples},
    )
