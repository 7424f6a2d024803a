"""The per-chunk work of preprocessing: read -> render -> clean -> hash -> tokenize -> + EOD.

Runs in worker threads (in-process mode) or worker processes. Everything that depends on the
order of records across chunks (dedup decisions, line numbers, writing) is left to the main
process, so results are identical for any number of workers.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from sfmed.core.errors import UserError
from sfmed.data.clean import make_cleaner
from sfmed.data.dedup import MinHasher, content_hashes
from sfmed.data.io import Chunk, read_chunk
from sfmed.data.readers import (
    Malformed,
    MalformedRecord,
    read_csv,
    read_json,
    read_jsonl,
    read_parquet,
    read_text,
)
from sfmed.data.render import make_renderer
from sfmed.data.tokenizer import load_tokenizer, reference_encoder

logger = logging.getLogger(__name__)

DROP_REASONS = (
    "empty",
    "too_short",
    "too_long",
    "malformed",
    "decode_error",
    "duplicate",
    "near_duplicate",
)


class TokenizerMismatchError(UserError, RuntimeError):
    """The fast tokenizer backend disagreed with the reference library (verify_tokenizer)."""


@dataclass
class SourceSpec:
    """What a worker needs to know about a source (picklable)."""

    name: str
    opts: Any  # ReaderOptions
    clean: dict | None  # make_cleaner kwargs, None when clean=false
    dedup: str
    near: dict | None  # MinHasher kwargs when dedup=near


@dataclass
class Task:
    """One unit of work: a chunk of a file of a source, or a Parquet row group."""

    src: int
    file_idx: int
    fmt: str
    chunk: Chunk | None = None
    row_group: int | None = None
    last: bool = False
    verify: int = 0
    nbytes: int = 0


@dataclass
class TaskResult:
    """Counts, errors and the encoded documents of one task."""

    src: int
    file_idx: int
    last: bool
    nbytes: int = 0
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("read", *DROP_REASONS), 0)
    )
    invalid_bytes: int = 0
    errors: list[tuple[Any, str]] = field(default_factory=list)
    n_lines: int = 0
    ids: np.ndarray | None = None  # flat, EOD after each document, output dtype
    lengths: np.ndarray | None = None  # per document, EOD included
    hashes: np.ndarray | None = None
    sigs: np.ndarray | None = None


@dataclass
class WorkerContext:
    """Shared, read-only state of the workers."""

    tokenizer_path: str
    backend: str
    eod_token: str | None
    dtype: str
    sources: list[SourceSpec]
    max_errors: int = 5
    tokenizer: Any = None  # loaded lazily (and inherited over fork)
    _cache: dict = field(default_factory=dict)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["tokenizer"] = None
        state["_cache"] = {}
        return state

    def tok(self):
        """The tokenizer, loaded on first use in this process."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_path, self.backend, self.eod_token)
        return self.tokenizer

    def per_source(self, i: int) -> tuple:
        """(renderer, cleaner or None, MinHasher or None) of source ``i``, built once."""
        if i not in self._cache:
            s = self.sources[i]
            cleaner = make_cleaner(**s.clean) if s.clean is not None else None
            hasher = MinHasher(**s.near) if s.near is not None else None
            self._cache[i] = (make_renderer(s.opts), cleaner, hasher)
        return self._cache[i]


_CTX: WorkerContext | None = None
# One encode call at a time per process: each call already uses every core (Rust threads), and
# concurrent calls split gigatoken's per-worker pretoken caches. The other worker thread
# meanwhile reads and parses the next chunk, which is what overlaps.
_ENCODE_LOCK = threading.Lock()


def set_context(ctx: WorkerContext) -> None:
    """Install the context used by :func:`run_task` in this process."""
    global _CTX
    _CTX = ctx


def init_process(ctx: WorkerContext) -> None:
    """Pool initializer of worker processes: only the main process handles Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if _CTX is not None and _CTX.tokenizer is not None:  # forked: reuse the parent's tokenizer
        ctx.tokenizer = _CTX.tokenizer
    set_context(ctx)


_UTF8 = ("utf-8", "utf8", "utf_8")


def _chunk_bytes(task: Task, opts) -> bytes:
    data = read_chunk(task.chunk)
    if (
        task.chunk.index == 0
        and data.startswith(b"\xef\xbb\xbf")
        and opts.encoding.lower() in _UTF8
    ):
        data = data[3:]
    return data


def _records(task: Task, opts, data: bytes | None) -> Iterator[tuple[Any, Any, int]]:
    enc = opts.encoding
    if task.fmt == "parquet":
        cols = None
        if opts.render == "field" and "." not in opts.text_field:
            cols = [opts.text_field]
        yield from read_parquet(task.chunk.file, task.row_group, cols)
    elif task.fmt == "jsonl":
        yield from read_jsonl(data, enc)
    elif task.fmt == "json":
        yield from read_json(data, enc, opts.json_key)
    elif task.fmt in ("csv", "tsv"):
        delim = opts.csv_delimiter or ("\t" if task.fmt == "tsv" else ",")
        yield from read_csv(data, enc, delim, opts.csv_columns)
    elif task.fmt == "text":
        yield from read_text(data, enc, opts.text_mode)
    else:
        raise ValueError(f"unknown reader {task.fmt!r}")


def add_eod(ids: np.ndarray, offsets: np.ndarray, eod: int, dtype: np.dtype):
    """Interleave ``eod`` after each document: ``(flat ids, lengths incl. EOD)``."""
    n = len(offsets) - 1
    lengths = np.diff(offsets) + 1
    out = np.empty(ids.size + n, dtype=dtype)
    eod_pos = offsets[1:] + np.arange(n)
    keep = np.ones(out.size, dtype=bool)
    keep[eod_pos] = False
    out[keep] = ids
    out[eod_pos] = eod
    return out, lengths


def run_task(task: Task) -> TaskResult:
    """Process one task with the installed context.

    A ``BaseException`` that is not an ``Exception`` (e.g. ``KeyboardInterrupt`` raised inside a
    worker) is re-raised as ``RuntimeError``: the pool reports exceptions but would otherwise
    lose the task and leave the main process waiting for its result forever.
    """
    try:
        return _run_task(task)
    except Exception:
        raise
    except BaseException as e:
        raise RuntimeError(f"worker stopped by {e!r}") from e


def _run_task(task: Task) -> TaskResult:
    ctx = _CTX
    spec = ctx.sources[task.src]
    opts = spec.opts
    render, clean, hasher = ctx.per_source(task.src)
    res = TaskResult(task.src, task.file_idx, task.last, nbytes=task.nbytes)
    counts, errors, cap = res.counts, res.errors, ctx.max_errors
    drop_bad = opts.decode_errors == "drop"
    texts: list[str] = []
    append = texts.append
    read = 0

    def handle(loc: Any, rec: Any, bad: int) -> None:
        """Count, render and clean one record (the general path)."""
        if bad:
            res.invalid_bytes += bad
            if len(errors) < cap:
                errors.append((loc, f"{bad} byte(s) invalid in {opts.encoding}"))
            if drop_bad:
                counts["decode_error"] += 1
                return
        if type(rec) is Malformed:
            counts["malformed"] += 1
            if len(errors) < cap:
                errors.append((loc, rec.msg))
            return
        try:
            text = render(rec)
        except MalformedRecord as e:
            counts["malformed"] += 1
            if len(errors) < cap:
                errors.append((loc, str(e)))
            return
        if clean is not None:
            text, reason = clean(text)
            if reason is not None:
                counts[reason] += 1
                return
        elif not text:
            counts["empty"] += 1
            return
        append(text)

    if task.fmt == "none":
        pass
    elif (
        task.fmt == "jsonl"
        and opts.render == "field"
        and "." not in opts.text_field
        and (opts.encoding.lower() in _UTF8)
    ):
        # The common case kept free of per-record generator/function overhead: a JSON object
        # with a non-empty string under the text field. Anything else takes the general path.
        key, loads, decode_error = opts.text_field, orjson.loads, orjson.JSONDecodeError
        lines = _chunk_bytes(task, opts).split(b"\n")
        res.n_lines = len(lines) - 1
        for i, line in enumerate(lines, 1):
            try:
                obj = loads(line)
            except decode_error:  # blank, malformed or undecodable line
                for _, rec, bad in read_jsonl(line, "utf-8"):
                    read += 1
                    handle(i, rec, bad)
                continue
            read += 1
            v = obj.get(key) if type(obj) is dict else None
            if type(v) is not str or not v:
                handle(i, obj, 0)
            elif clean is None:
                append(v)
            else:
                text, reason = clean(v)
                if reason is None:
                    append(text)
                else:
                    counts[reason] += 1
    else:
        data = None if task.fmt == "parquet" else _chunk_bytes(task, opts)
        res.n_lines = data.count(b"\n") if data is not None else 0
        for loc, rec, bad in _records(task, opts, data):
            read += 1
            handle(loc, rec, bad)
    counts["read"] = read

    tok = ctx.tok()
    with _ENCODE_LOCK:
        ids, offsets = tok.encode_flat(texts)
    if task.verify and texts:
        _verify(ctx, texts, ids, offsets, task.verify, spec.name)
    res.ids, res.lengths = add_eod(ids, offsets, tok.info.eod_id, np.dtype(ctx.dtype))
    if spec.dedup != "none":
        res.hashes = content_hashes(texts)
    if hasher is not None:
        res.sigs = hasher.signatures(texts)
    return res


def _verify(ctx: WorkerContext, texts, ids, offsets, n: int, name: str) -> None:
    ref = ctx._cache.get("reference")
    if ref is None:
        ref = ctx._cache["reference"] = reference_encoder(ctx.tokenizer_path)
    picks = np.unique(np.linspace(0, len(texts) - 1, num=min(n, len(texts))).astype(int))
    for i in picks.tolist():
        got = ids[offsets[i] : offsets[i + 1]].tolist()
        want = ref(texts[i])
        if got != want:
            raise TokenizerMismatchError(
                f"source {name}: the {ctx.tok().info.backend} backend's ids differ from the "
                f"reference tokenizer on a document starting {texts[i][:60]!r} "
                f"({len(got)} vs {len(want)} ids); set tokenizer_backend=hf or sentencepiece"
            )
