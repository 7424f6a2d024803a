"""Planning a preprocessing run: sources and their files, resume fingerprints, and the stream of
chunk tasks handed to the workers."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfmed.config.data import PreprocessConfig, ReaderOptions, SourceConfig
from sfmed.data.io import (
    Chunk,
    InputError,
    compression_of,
    detect_format,
    expand_files,
    newline_safe,
    plan_chunks,
    source_stem,
    stream_chunks,
)
from sfmed.data.metadata import DatasetMetadataError, check_files_match, config_hash, read_sidecar
from sfmed.data.worker import SourceSpec, Task

logger = logging.getLogger(__name__)

PIPELINE_VERSION = 1
AUTO_PROCESS_MIN_BYTES = 256 << 20


@dataclass
class Source:
    """A source resolved for this run."""

    name: str
    group: str
    opts: ReaderOptions
    files: list[Path]
    formats: list[str]
    prefix: Path
    min_chars: int
    max_chars: int
    fingerprint: str = ""
    reuse: dict | None = None  # sidecar of complete, up-to-date outputs


def output_prefix(output_dir: str | Path, name: str) -> Path:
    """``<output_dir>/<name>_text_document``."""
    return Path(output_dir) / f"{name}_text_document"


def _reader_opts(cfg: PreprocessConfig) -> ReaderOptions:
    return ReaderOptions(
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ReaderOptions)}
    )


def resolve_sources(cfg: PreprocessConfig) -> list[Source]:
    """The sources of a run with their files and formats; raises before any work on bad input."""
    specs: list[tuple[str, str, ReaderOptions, list[str], str | None]] = []
    if cfg.input:
        name = cfg.name or source_stem(cfg.input)
        specs.append((name, cfg.group, _reader_opts(cfg), [cfg.input], None))
    else:
        for key, s in cfg.sources.items():
            if not s.enabled:
                continue
            if not isinstance(s, SourceConfig):
                s = SourceConfig(**s)
            specs.append((key, s.group, s, list(s.files), cfg.data_root))
    out: list[Source] = []
    names: set[str] = set()
    problems: list[str] = []  # every missing file or empty glob of every source, reported at once
    for name, group, opts, patterns, base in specs:
        if not name or any(c in name for c in "/\\ ") or name.startswith("."):
            raise InputError(f"source name {name!r} must be non-empty, without '/', '\\' or spaces")
        if name in names:
            raise InputError(f"two sources are named {name!r}; names must be unique")
        names.add(name)
        found = []
        for pat in patterns:
            try:
                expand_files([pat], base)
                found.append(pat)
            except InputError as e:
                problems.append(f"source {name}: {e}")
        if len(found) < len(patterns):
            continue
        files = expand_files(found, base)
        formats = []
        for f in files:
            fmt = opts.reader if opts.reader != "auto" else detect_format(f)
            if opts.render != "field" and fmt == "text":
                raise InputError(
                    f"source {name}: {f} is read as plain text but render={opts.render!r} needs "
                    "structured records; set reader= (jsonl/json/csv/tsv/parquet)"
                )
            formats.append(fmt)
        c = cfg.cleaning
        out.append(
            Source(
                name=name,
                group=group,
                opts=opts,
                files=files,
                formats=formats,
                prefix=output_prefix(cfg.output_dir, name),
                min_chars=c.min_chars if opts.min_chars is None else opts.min_chars,
                max_chars=c.max_chars if opts.max_chars is None else opts.max_chars,
            )
        )
    if problems:
        if len(problems) == 1:
            raise InputError(problems[0])
        body = "\n".join(f"  - {p}" for p in problems)
        raise InputError(f"{len(problems)} inputs are missing:\n{body}")
    return out


def fingerprints(cfg: PreprocessConfig, sources: list[Source], tok_info, dtype) -> None:
    """Set each source's resume fingerprint (chained over earlier sources when dedup is on:
    their content decides what counts as a duplicate)."""
    upstream: list[str] = []
    for s in sources:
        cleaning = None
        if cfg.clean:
            limits = {"min_chars": s.min_chars, "max_chars": s.max_chars}
            cleaning = {**dataclasses.asdict(cfg.cleaning), **limits}
        blob = {
            "version": PIPELINE_VERSION,
            "name": s.name,
            "reader": s.opts.reader_options(),
            "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in s.files],
            "clean": cfg.clean,
            "cleaning": cleaning,
            "dedup": cfg.dedup,
            "near": dataclasses.asdict(cfg.near_dedup) if cfg.dedup == "near" else None,
            "tokenizer": tok_info.file_digest,
            "eod_id": tok_info.eod_id,
            "dtype": np.dtype(dtype).name,
            "upstream": list(upstream) if cfg.dedup != "none" else None,
        }
        s.fingerprint = config_hash(blob)
        upstream.append(s.fingerprint)


def reusable(s: Source, dedup: str) -> dict | None:
    """The sidecar of ``s`` if its outputs are complete and match the fingerprint, else None."""
    try:
        meta = read_sidecar(s.prefix)
        if meta is None or meta.get("fingerprint") != s.fingerprint:
            return None
        check_files_match(s.prefix, meta)
    except DatasetMetadataError as e:
        logger.info("%s: redoing (%s)", s.name, e)
        return None
    if dedup != "none" and not Path(f"{s.prefix}.dedup.npz").is_file():
        return None
    if not meta.get("documents"):
        # An empty output of an earlier version: redo it, so that it is refused with the reason.
        return None
    return meta


def worker_spec(cfg: PreprocessConfig, s: Source) -> SourceSpec:
    """What the workers need to know about a source."""
    clean = None
    if cfg.clean:
        c = cfg.cleaning
        clean = {
            "unicode_form": c.unicode,
            "html_": c.strip_html,
            "whitespace": c.whitespace,
            "min_chars": s.min_chars,
            "max_chars": s.max_chars,
        }
    near = None
    if cfg.dedup == "near":
        n = cfg.near_dedup
        near = {"num_perm": n.num_perm, "ngram": n.ngram, "seed": n.seed}
    return SourceSpec(name=s.name, opts=s.opts, clean=clean, dedup=cfg.dedup, near=near)


def _file_tasks(src_i: int, file_i: int, path: Path, fmt: str, opts, chunk_bytes: int):
    if fmt == "parquet":
        import pyarrow.parquet as pq

        md = pq.ParquetFile(path).metadata
        for rg in range(md.num_row_groups):
            yield Task(
                src_i,
                file_i,
                fmt,
                chunk=_whole(path),
                row_group=rg,
                nbytes=md.row_group(rg).total_byte_size,
            )
        return
    sep = None
    if fmt == "jsonl" or (fmt == "text" and opts.text_mode == "line"):
        sep = b"\n"
    elif fmt == "text" and opts.text_mode == "paragraph":
        sep = b"\n\n"
    if sep is not None and not newline_safe(opts.encoding):
        sep = None
    comp = compression_of(path)
    size = path.stat().st_size
    if comp is not None and sep is not None:
        for ch in stream_chunks(path, comp, chunk_bytes, sep):
            yield Task(src_i, file_i, fmt, chunk=ch, nbytes=len(ch.data))
        return
    for ch in plan_chunks(path, chunk_bytes, sep):
        n = (ch.end if ch.end is not None else size) - ch.start
        yield Task(src_i, file_i, fmt, chunk=ch, nbytes=n)


def _whole(path: Path):
    return Chunk(str(path), whole_file=True)


class Gate:
    """Bounds how far task production (the pool's feeder thread) runs ahead of the consumer;
    ``stop()`` lets a feeder blocked on it finish, so the pool can shut down after Ctrl-C."""

    def __init__(self, window: int):
        self._sem = threading.Semaphore(window)
        self.stopped = False

    def acquire(self) -> bool:
        """Wait for room; False once stopped."""
        self._sem.acquire()
        return not self.stopped

    def release(self) -> None:
        """A result was consumed."""
        self._sem.release()

    def stop(self) -> None:
        """Unblock and end task production."""
        self.stopped = True
        self._sem.release(1 << 20)


def tasks(sources: list[Source], cfg: PreprocessConfig, gate: Gate, workers: int) -> Iterator[Task]:
    """All tasks of the sources to (re)do, in order; the last task of each source is marked.
    ``gate`` bounds how far task production runs ahead of result consumption."""
    size = chunk_bytes(cfg, sources, workers)
    for i, s in enumerate(sources):
        if s.reuse is not None:
            continue
        prev: Task | None = None
        verify = cfg.verify_tokenizer
        for fi, (f, fmt) in enumerate(zip(s.files, s.formats)):
            for t in _file_tasks(i, fi, f, fmt, s.opts, size):
                if prev is not None:
                    if not gate.acquire():
                        return
                    yield prev
                if verify:
                    t.verify, verify = verify, 0
                prev = t
        if prev is None:  # no data at all (e.g. Parquet files without row groups)
            prev = Task(i, 0, "none")
        prev.last = True
        if not gate.acquire():
            return
        yield prev


def chunk_bytes(cfg: PreprocessConfig, sources: list[Source], workers: int) -> int:
    """At most ``chunk_mb``; for small inputs about four chunks per worker (down to 1 MiB), so
    that parsing the next chunk overlaps tokenizing this one. Fewer, larger chunks are better
    otherwise: each encode call ends with a tail where not every core has work."""
    total = sum(f.stat().st_size for s in sources if s.reuse is None for f in s.files)
    auto = max(1 << 20, total // (4 * max(workers, 1)))
    return max(1, int(min(cfg.chunk_mb * (1 << 20), auto)))


def choose_workers(cfg: PreprocessConfig, sources: list[Source]) -> int:
    """``workers`` or, when 0, the automatic choice: in-process for small inputs or <= 4 cores
    (the Rust tokenizer uses every core itself), else one process per core."""
    if cfg.workers:
        return cfg.workers
    total = sum(f.stat().st_size for s in sources if s.reuse is None for f in s.files)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1 if cpus <= 4 or total < AUTO_PROCESS_MIN_BYTES else cpus
