"""Best-fit-decreasing packing against a naive reference."""

from __future__ import annotations

import numpy as np
import pytest

from sfmed.data.chat.pack import pack_bfd, packing_stats


def _naive_bfd(lengths, cap):
    """O(n^2) best fit decreasing: the free spaces of the bins it ends with."""
    free: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [r for r in free if r >= n]
        if fits:
            free.remove(min(fits))
            free.append(min(fits) - n)
        else:
            free.append(cap - n)
    return sorted(free)


@pytest.mark.parametrize("seed", range(6))
def test_pack_matches_naive_best_fit(seed):
    rng = np.random.default_rng(seed)
    cap = int(rng.choice([16, 100, 4096]))
    lengths = rng.integers(1, cap + 1, size=int(rng.integers(1, 400)))
    if seed % 2:  # many short items, the SFT case
        lengths = np.minimum(lengths, max(1, cap // 7))
    bins = pack_bfd(lengths, cap)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= cap for b in bins)
    assert all(b == sorted(b) for b in bins)
    assert sorted(cap - sum(lengths[i] for i in b) for b in bins) == _naive_bfd(lengths, cap)
    assert len(bins) >= -(-int(lengths.sum()) // cap)


def test_pack_edges():
    assert pack_bfd(np.array([], np.int64), 8) == []
    assert pack_bfd(np.array([8, 8]), 8) == [[0], [1]]
    assert pack_bfd(np.array([3, 5, 4, 4]), 8) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="1..8"):
        pack_bfd(np.array([9]), 8)
    with pytest.raises(ValueError):
        pack_bfd(np.array([0]), 8)


def test_packing_stats():
    st = packing_stats(np.array([8, 6]), np.array([4, 3]), 8)
    assert st == {"packs": 2, "capacity": 16, "efficiency": 14 / 16, "supervised_fraction": 7 / 16}
    assert packing_stats(np.array([]), np.array([]), 8)["efficiency"] == 0.0
