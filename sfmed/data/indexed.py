"""Megatron indexed datasets (``.bin`` + ``.idx``) written in bulk.

megatron-core 0.16's ``IndexedDatasetBuilder`` takes one document at a time and computes the
sequence pointers in a Python loop; here the token buffer of a whole chunk is written with one
``write`` and the ``.idx`` is produced with numpy in exactly the byte layout megatron-core's
``_IndexWriter`` writes (tests compare the bytes with the builder's own output), so
``IndexedDataset``/``GPTDataset``/blending read it unchanged.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from sfmed.core.atomic import default_file_mode

_INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType codes
_DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int) -> np.dtype:
    """The token dtype megatron picks for a vocabulary (``DType.optimal_dtype``)."""
    return (
        np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)
    )


def bin_path(prefix: str | os.PathLike) -> Path:
    """``<prefix>.bin``."""
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    """``<prefix>.idx``."""
    return Path(f"{os.fspath(prefix)}.idx")


def index_bytes(
    lengths: np.ndarray, dtype: np.dtype, document_indices: np.ndarray | None = None
) -> bytes:
    """The ``.idx`` contents for sequences of ``lengths`` tokens; one sequence per document, or
    documents starting at the sequence indices ``document_indices`` (``[0, ..., n]``)."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int64)
    n = int(lengths.shape[0])
    if n and int(lengths.max()) > np.iinfo(np.int32).max:
        raise ValueError("a document longer than 2**31-1 tokens cannot be indexed")
    pointers = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
    if document_indices is None:
        doc_idx = np.arange(n + 1, dtype=np.int64)
    else:
        doc_idx = np.asarray(document_indices, dtype=np.int64)
        if doc_idx[0] != 0 or doc_idx[-1] != n or np.any(np.diff(doc_idx) < 0):
            raise ValueError("document_indices must rise from 0 to the number of sequences")
    return b"".join(
        (
            _INDEX_HEADER,
            struct.pack("<Q", 1),
            struct.pack("<B", _DTYPE_CODES[dtype]),
            struct.pack("<Q", n),
            struct.pack("<Q", doc_idx.shape[0]),
            lengths.astype(np.int32).tobytes(order="C"),
            pointers.tobytes(order="C"),
            doc_idx.tobytes(order="C"),
        )
    )


def read_index_header(prefix: str | os.PathLike) -> dict:
    """dtype, sequence/document counts and total tokens of ``<prefix>.idx`` (no megatron import)."""
    p = idx_path(prefix)
    with open(p, "rb") as f:
        head = f.read(34)
        if len(head) < 34 or head[:9] != _INDEX_HEADER:
            raise ValueError(f"{p} is not a Megatron .idx file (bad header)")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != 1:
            raise ValueError(f"{p} has index version {version}; only version 1 is supported")
        dtype = _CODE_DTYPES[head[17]]
        n_seq, n_doc = struct.unpack("<QQ", head[18:34])
        lengths = np.frombuffer(f.read(4 * n_seq), dtype=np.int32)
    return {
        "dtype": dtype.name,
        "sequences": int(n_seq),
        "documents": int(n_doc) - 1,
        "tokens": int(lengths.sum(dtype=np.int64)),
    }


class BulkIndexedWriter:
    """Append documents to ``<prefix>.bin`` chunk by chunk; ``finish()`` writes the ``.idx``.

    Both files are written under temporary names in the destination folder and only renamed to
    their final names by ``finish()`` (``.bin`` first, then ``.idx``), so an interrupted run never
    leaves a pair that looks complete. ``abort()`` (also on exceptions in ``with``) removes them.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.prefix.name}.bin.tmp-", dir=self.prefix.parent)
        os.fchmod(fd, default_file_mode())
        self._bin_tmp = Path(tmp)
        self._bin = os.fdopen(fd, "wb", buffering=0)
        self._lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0
        self.bin_bytes = 0
        self.idx_bytes = 0

    def add_chunk(self, flat_ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat id array and their lengths (EOD already included)."""
        flat = np.ascontiguousarray(flat_ids, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.shape[0]:
            raise ValueError("lengths do not add up to the number of ids")
        self._bin.write(memoryview(flat).cast("B"))
        self._lengths.append(lengths)
        self.documents += int(lengths.shape[0])
        self.tokens += int(flat.shape[0])
        self.bin_bytes += flat.nbytes

    def finish(self, document_indices: np.ndarray | None = None) -> None:
        """Flush and fsync the ``.bin``, write the ``.idx`` and rename both into place;
        ``document_indices`` groups the sequences into documents (default one each)."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        blob = index_bytes(lengths, self.dtype, document_indices)
        fd, itmp = tempfile.mkstemp(prefix=f".{self.prefix.name}.idx.tmp-", dir=self.prefix.parent)
        os.fchmod(fd, default_file_mode())
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(self._bin_tmp, bin_path(self.prefix))
            os.replace(itmp, idx_path(self.prefix))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(itmp)
            self.abort()
            raise
        self.idx_bytes = len(blob)

    def abort(self) -> None:
        """Close and delete the temporary ``.bin``."""
        with contextlib.suppress(Exception):
            self._bin.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._bin_tmp)

    def __enter__(self) -> BulkIndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def remove_outputs(prefix: str | os.PathLike) -> None:
    """Delete ``<prefix>.json``, ``.idx`` and ``.bin`` in that order (sidecar first: a crash in
    between never leaves a sidecar naming missing or stale files)."""
    prefix = os.fspath(prefix)
    for ext in (".json", ".dedup.npz", ".idx", ".bin"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(prefix + ext)
