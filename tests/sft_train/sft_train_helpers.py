"""Helpers of the SFT training tests: small SFT datasets written in the preprocessing format."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_sft_dataset(prefix: Path, packs, seq_length: int, vocab_size: int, eod_id: int = 0):
    """Write ``packs`` (a list of samples, each a list of (ids, target-mask) conversations) as
    ``launch/preprocess.py format=sft`` does."""
    from sfmed.data.chat.store import ChatWriter

    w = ChatWriter(prefix, np.uint16)
    for pack in packs:
        w.add_sample(
            [np.asarray(i, np.uint16) for i, _ in pack], [np.asarray(m, np.uint8) for _, m in pack]
        )
    w.finish(
        {
            "kind": "sft",
            "seq_length": seq_length,
            "mask": "all",
            "tokenizer": {"vocab_size": vocab_size, "eod_id": eod_id},
            "stats": {"packing": {"packed": any(len(p) > 1 for p in packs)}},
        }
    )
    return prefix


def random_conversations(n: int, rng, lo: int, hi: int, vocab: int):
    """``n`` conversations of random ids in [1, vocab) with a target mask on about half."""
    out = []
    for _ in range(n):
        k = int(rng.integers(lo, hi + 1))
        ids = rng.integers(1, vocab, k)
        mask = np.zeros(k, np.uint8)
        mask[k // 2 :] = 1  # the "answer": the second half
        out.append((ids, mask))
    return out


def pack_greedy(convs, cap: int):
    """First-fit packing of ``convs`` into samples of at most ``cap`` tokens."""
    packs: list[list] = []
    for c in convs:
        for p in packs:
            if sum(len(i) for i, _ in p) + len(c[0]) <= cap:
                p.append(c)
                break
        else:
            packs.append([c])
    return packs
