"""Exact (content hash) and near-duplicate (MinHash/LSH, datasketch) removal across sources.

Workers compute a 64-bit content hash and, for ``dedup=near``, a MinHash signature per text;
the main process decides in a fixed order (sources, files, records), so the first occurrence is
kept and the result does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np


def content_hashes(texts: list[str]) -> np.ndarray:
    """A 64-bit BLAKE2b hash of each text's UTF-8 bytes."""
    out = np.empty(len(texts), dtype=np.uint64)
    blake = hashlib.blake2b
    for i, t in enumerate(texts):
        out[i] = int.from_bytes(
            blake(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
        )
    return out


class ExactDedup:
    """The set of content hashes kept so far."""

    def __init__(self):
        self.seen: set[int] = set()

    def keep_mask(self, hashes: np.ndarray) -> np.ndarray:
        """True for each hash not seen before (earlier in this batch included); records them."""
        seen, keep = self.seen, np.ones(len(hashes), dtype=bool)
        for i, h in enumerate(hashes.tolist()):
            if h in seen:
                keep[i] = False
            else:
                seen.add(h)
        return keep

    def add(self, hashes: np.ndarray) -> None:
        """Record hashes of outputs kept by an earlier (resumed) run."""
        self.seen.update(hashes.tolist())


class MinHasher:
    """MinHash signatures of character n-gram sets with datasketch (``crc32`` shingle hashes)."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        from datasketch import MinHash

        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        self._proto = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32)

    def signatures(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), num_perm]`` signatures (datasketch's hash values)."""
        out = np.empty((len(texts), self.num_perm), dtype=self._proto.hashvalues.dtype)
        n = self.ngram
        for i, t in enumerate(texts):
            m = self._proto.copy()
            if len(t) <= n:
                shingles = [t.encode("utf-8", "surrogatepass")]
            else:
                shingles = list({t[j : j + n] for j in range(len(t) - n + 1)})
                shingles = [s.encode("utf-8", "surrogatepass") for s in shingles]
            m.update_batch(shingles)
            out[i] = m.hashvalues
        return out


class NearDedup:
    """A datasketch ``MinHashLSH`` index: a text is a near-duplicate when the index returns a
    candidate for its signature (estimated Jaccard above ``threshold``)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 1):
        from datasketch import LeanMinHash, MinHash, MinHashLSH

        # The scheme MinHasher's signatures were made with (datasketch >= 2: affine32).
        self.scheme = getattr(MinHash(num_perm=num_perm, seed=seed), "scheme", None)

        self._lean = LeanMinHash
        self.seed = seed
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._next = 0

    def _minhash(self, sig: np.ndarray):
        if self.scheme is None:  # datasketch < 2.0 has a single scheme
            return self._lean(seed=self.seed, hashvalues=sig)
        return self._lean(seed=self.seed, hashvalues=sig, scheme=self.scheme)

    def keep_mask(self, sigs: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
        """For rows of ``sigs`` (where ``candidates`` is True): keep unless similar to an
        already kept text; kept ones are inserted."""
        keep = np.ones(len(sigs), dtype=bool) if candidates is None else candidates.copy()
        for i in np.flatnonzero(keep):
            m = self._minhash(sigs[i])
            if self.lsh.query(m):
                keep[i] = False
            else:
                self.lsh.insert(self._next, m, check_duplication=False)
                self._next += 1
        return keep

    def add(self, sigs: np.ndarray) -> None:
        """Insert signatures of outputs kept by an earlier (resumed) run."""
        for row in sigs:
            self.lsh.insert(self._next, self._minhash(row), check_duplication=False)
            self._next += 1
