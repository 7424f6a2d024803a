"""Offline packing: items of given lengths into bins of ``capacity`` tokens, best-fit decreasing.

Best-fit decreasing places each item (longest first) into the open bin whose free space is the
smallest that still holds it; it never uses more bins than first-fit decreasing and packs
tighter. Free spaces are kept in a segment tree over ``0..capacity``, so each item costs
O(log capacity) whatever the number of bins.
"""

from __future__ import annotations

import numpy as np


def pack_bfd(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins as lists of item indices (each bin's items in input order; bins ordered by their
    first item). Every length must be in ``1..capacity``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return []
    if int(lengths.min()) < 1 or int(lengths.max()) > capacity:
        raise ValueError(f"item lengths must be in 1..{capacity}")
    size = 1
    while size < capacity + 1:
        size *= 2
    tree = [0] * (2 * size)  # tree[size + r]: open bins with r tokens free; inner nodes: sums
    free: list[list[int]] = [[] for _ in range(capacity + 1)]  # free space -> bin ids
    bins: list[list[int]] = []
    space: list[int] = []

    def add(r: int, d: int) -> None:
        i = size + r
        while i:
            tree[i] += d
            i //= 2

    def smallest_at_least(s: int) -> int:
        """Smallest free space >= s held by an open bin, or -1."""
        i = size + s
        if tree[i]:
            return s
        # Walk up until a right sibling subtree holds a bin, then down to its leftmost leaf.
        while i > 1:
            if i % 2 == 0 and tree[i + 1]:
                i += 1
                break
            i //= 2
        else:
            return -1
        while i < size:
            i = 2 * i if tree[2 * i] else 2 * i + 1
        return i - size

    order = np.argsort(-lengths, kind="stable")
    for item in order.tolist():
        n = int(lengths[item])
        r = smallest_at_least(n)
        if r < 0:
            b = len(bins)
            bins.append([item])
            space.append(capacity - n)
        else:
            b = free[r].pop()
            add(r, -1)
            bins[b].append(item)
            space[b] = r - n
        if space[b] > 0:
            free[space[b]].append(b)
            add(space[b], 1)
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
