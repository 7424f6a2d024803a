"""Pre-flight checks of indexed datasets for training, before any process group or model exists.

Torch-free and megatron-free (numpy and the standard library only), so a launcher can run them in
well under a second and refuse a run before it costs anything:

- :func:`check_prefix`: the dataset exists, is not empty, and its ids fit the model — compared
  through the ``.json`` sidecar's recorded tokenizer (vocabulary size, hash, EOD id), or, for a
  dataset without a sidecar (made by another tool), through one pass over the ``.bin``
  (:func:`max_token_id`);
- :func:`split_sizes` / :func:`check_splits`: the documents each train/valid/test split gets,
  computed exactly as megatron-core's ``BlendedMegatronDatasetBuilder`` does, so that a split
  that is requested but empty (megatron's ``GPTDataset`` then loops forever looking for a
  sample) is refused naming the split.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np

from sfmed.core.errors import ConfigError
from sfmed.data.indexed import bin_path, idx_path, read_index_header
from sfmed.data.metadata import DatasetMetadataError, check_files_match, read_sidecar

SPLIT_NAMES = ("train", "valid", "test")
# ids read per step of max_token_id: 64 Mi ids is 128-256 MiB of page cache, a few ms of numpy.
_CHUNK_IDS = 1 << 26


def max_token_id(prefix: str | os.PathLike, dtype: str | np.dtype | None = None) -> int:
    """The largest token id in ``<prefix>.bin`` (-1 for an empty file), in one chunked pass.

    ``dtype`` defaults to the one recorded in ``<prefix>.idx``.
    """
    if dtype is None:
        dtype = read_index_header(prefix)["dtype"]
    dtype = np.dtype(dtype)
    path = bin_path(prefix)
    n = path.stat().st_size // dtype.itemsize
    if n == 0:
        return -1
    ids = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    best = -1
    for start in range(0, n, _CHUNK_IDS):
        best = max(best, int(ids[start : start + _CHUNK_IDS].max()))
    del ids
    return best


def _fmt_tok(tok: dict) -> str:
    parts = [f"vocab size {tok.get('vocab_size'):,}" if tok.get("vocab_size") else None]
    parts.append(f"hash {tok.get('hash')}" if tok.get("hash") else None)
    parts.append(f"EOD id {tok.get('eod_id')}" if tok.get("eod_id") is not None else None)
    where = f"tokenizer {tok.get('path')}" if tok.get("path") else "its tokenizer"
    return f"{where} ({', '.join(p for p in parts if p)})"


def check_prefix(
    prefix: str | os.PathLike,
    *,
    vocab_size: int,
    tokenizer_hash: str | None = None,
    eod_id: int | None = None,
) -> list[str]:
    """Every problem that makes ``prefix`` unusable for a model with ``vocab_size`` ids.

    ``vocab_size`` is the model's (padded) vocabulary; ``tokenizer_hash``
    (:func:`sfmed.data.metadata.tokenizer_hash`) and ``eod_id`` are the model's tokenizer's, when
    known. Each message names the prefix, what the data records and what the model has, and the
    fix. An empty list means the dataset can be trained on.
    """
    p = os.fspath(prefix)
    if p.endswith((".bin", ".idx", ".json")):
        return [
            f"data prefix {p} ends with its extension; give the prefix without .bin/.idx/.json "
            f"({p.rsplit('.', 1)[0]})"
        ]
    missing = [str(f) for f in (bin_path(p), idx_path(p)) if not f.is_file()]
    if missing:
        return [
            f"data prefix {p}: {' and '.join(missing)} not found; run launch/preprocess.py for "
            "it or fix the prefix"
        ]
    remake = "re-run launch/preprocess.py for this source"
    try:
        meta = read_sidecar(p)
        if meta is not None:
            check_files_match(p, meta)
    except DatasetMetadataError as e:
        return [f"data prefix {p}: {e}"]
    try:
        header = read_index_header(p)
    except (ValueError, KeyError, OSError) as e:
        return [f"data prefix {p}: {idx_path(p)} is unreadable ({e}); {remake}"]

    problems: list[str] = []
    if header["documents"] == 0 or bin_path(p).stat().st_size == 0:
        return [
            f"data prefix {p} is empty (0 documents, {bin_path(p).stat().st_size} bytes of "
            f"tokens); training on it cannot draw a sample. Check the source's preprocessing "
            f"report ({Path(p).parent}/report.md) and {remake}, or leave the prefix out"
        ]
    model = f"the model's vocabulary has {vocab_size:,} ids"
    if tokenizer_hash:
        model += f", tokenizer hash {tokenizer_hash}"
    if eod_id is not None:
        model += f", EOD id {eod_id}"
    fix = (
        "preprocess the data with the model's tokenizer (launch/preprocess.py tokenizer=<the "
        "model's tokenizer>) or train the model the data was made for"
    )
    if meta is None:
        top = max_token_id(p, header["dtype"])
        if top >= vocab_size:
            problems.append(
                f"data prefix {p} (no .json sidecar: made by another tool) holds token id "
                f"{top:,}, but {model}: the ids do not fit the model. Fix: {fix}"
            )
        return problems
    tok = dict(meta.get("tokenizer") or {})
    data = f"data prefix {p} was tokenized with {_fmt_tok(tok)}"
    data_vocab = tok.get("vocab_size")
    if isinstance(data_vocab, int) and data_vocab > vocab_size:
        problems.append(f"{data}, but {model}: ids up to {data_vocab - 1:,} do not fit. Fix: {fix}")
    if tokenizer_hash and tok.get("hash") and tok["hash"] != tokenizer_hash:
        problems.append(
            f"{data}, but the model's tokenizer has hash {tokenizer_hash}: the same ids mean "
            f"different text. Fix: {fix}"
        )
    if eod_id is not None and tok.get("eod_id") is not None and tok["eod_id"] != eod_id:
        problems.append(
            f"{data}, but the model's EOD id is {eod_id}: documents would not be separated by "
            f"the model's end-of-document token. Fix: {fix} (or set the data's EOD, data.eod_id="
            f"{tok['eod_id']}, if that is what the model was trained with)"
        )
    return problems


def parse_split(split: str) -> list[float]:
    """megatron-core's ``parse_and_normalize_split``: ``"99,1,0"`` -> ``[0.99, 0.01, 0.0]``.

    Raises ``ConfigError`` for what megatron would reject with a bare assertion.
    """
    values = [float(v) for v in re.findall(r"[.0-9]+", str(split))]
    if not values or len(values) > len(SPLIT_NAMES):
        raise ConfigError(
            f"split={split!r} must give 1 to 3 non-negative weights for train,valid,test, "
            "e.g. split=99,1,0"
        )
    values += [0.0] * (len(SPLIT_NAMES) - len(values))
    w = np.array(values, dtype=np.float64)
    total = np.sum(w)
    if total <= 0:
        raise ConfigError(f"split={split!r} has no positive weight; e.g. split=99,1,0")
    return (w / total).tolist()


def split_sizes(num_documents: int, split: str = "99,1,0") -> list[int | None]:
    """Documents per train/valid/test split of a dataset of ``num_documents`` documents, exactly
    as megatron-core's ``BlendedMegatronDatasetBuilder`` cuts it (``None``: a split of weight 0,
    which megatron does not build; ``0``: a split that is built but empty)."""
    vector = parse_split(split)
    # convert_split_vector_to_split_matrix: book-ends from running sums, None for empty ranges
    ends = functools.reduce(lambda a, b: a + [a[-1] + b], [[0], *vector])
    sizes: list[int | None] = []
    for lo, hi in zip(ends[:-1], ends[1:]):
        if hi <= lo:
            sizes.append(None)
            continue
        beg = int(round(lo * float(num_documents)))
        end = int(round(hi * float(num_documents)))
        sizes.append(max(0, end - beg))
    return sizes


def check_splits(
    num_documents: int,
    split: str = "99,1,0",
    *,
    prefix: str | os.PathLike | None = None,
    needed: tuple[str, ...] = ("train", "valid"),
) -> list[str]:
    """A message for each split in ``needed`` that megatron would build with 0 documents.

    ``needed`` names the splits the run reads (``valid`` only when it evaluates). A split of
    weight 0 is not built and is not a problem.
    """
    sizes = split_sizes(num_documents, split)
    what = f"data prefix {os.fspath(prefix)}" if prefix is not None else "the data"
    problems = []
    for name, size in zip(SPLIT_NAMES, sizes):
        if name not in needed or size is None or size > 0:
            continue
        i = SPLIT_NAMES.index(name)
        enough = next(
            (
                n
                for n in range(num_documents + 1, num_documents + 10**6)
                if split_sizes(n, split)[i]
            ),
            None,
        )
        more = f"at least {enough:,} documents" if enough else "more documents"
        alt = " or turn evaluation off (eval_interval=0)" if name == "valid" else ""
        problems.append(
            f"{what} has {num_documents:,} documents, so split={split} gives the {name} split "
            f"0 documents (megatron would build it empty and never find a sample). Fix: {more}, "
            f"a larger {name} weight (e.g. split=90,10,0){alt}"
        )
    return problems
