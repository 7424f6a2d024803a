"""Offline packing: items of given lengths into bins of ``capacity`` tokens, best-fit decreasing.

Best-fit decreasing places each item (longest first) into the open bin whose free space is the
smallest that still holds it; it never uses more bins than first-fit decreasing and packs
tighter. The distinct free spaces of open bins are kept sorted (at most ``capacity`` of them), so
each item costs a binary search whatever the number of bins.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np


def pack_bfd(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins as lists of item indices (each bin's items in input order; bins ordered by their
    first item). Every length must be in ``1..capacity``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return []
    if int(lengths.min()) < 1 or int(lengths.max()) > capacity:
        raise ValueError(f"item lengths must be in 1..{capacity}")
    keys: list[int] = []  # the distinct free spaces of open bins, sorted
    free: dict[int, list[int]] = {}  # free space -> open bins with it
    bins: list[list[int]] = []
    order = np.argsort(-lengths, kind="stable")
    for item, n in zip(order.tolist(), lengths[order].tolist(), strict=True):
        k = bisect_left(keys, n)
        if k == len(keys):
            b, r = len(bins), capacity - n
            bins.append([item])
        else:
            space = keys[k]
            same = free[space]
            b = same.pop()
            if not same:
                del keys[k], free[space]
            bins[b].append(item)
            r = space - n
        if r > 0:
            same = free.get(r)
            if same is None:
                free[r] = [b]
                insort(keys, r)
            else:
                same.append(b)
    for b in bins:
        b.sort()
    bins.sort(key=lambda b: b[0])
    return bins


def packing_stats(bin_tokens: np.ndarray, bin_supervised: np.ndarray, capacity: int) -> dict:
    """Packing efficiency: non-pad and supervised tokens over capacity (packs x capacity)."""
    n = int(len(bin_tokens))
    cap = n * capacity
    tokens, sup = int(np.sum(bin_tokens)), int(np.sum(bin_supervised))
    return {
        "packs": n,
        "capacity": cap,
        "efficiency": tokens / cap if cap else 0.0,
        "supervised_fraction": sup / cap if cap else 0.0,
    }
