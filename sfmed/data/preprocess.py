"""Corpora -> Megatron indexed datasets (``<output_dir>/<source>_text_document.bin/.idx``) + report.

Order of work: resolve sources and files (errors before any work), load the tokenizer, decide per
source whether complete outputs can be reused (sidecar fingerprint = source config + input file
stats + cleaning/dedup settings + tokenizer hash, chained over earlier sources when dedup is on),
then stream chunks through workers and consume the results in order: dedup decisions, bulk
writes, then per source ``.bin`` -> ``.idx`` -> dedup state -> sidecar (the sidecar last).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import multiprocessing as mp
import sys
import time
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np

from sfmed.config.data import PreprocessConfig
from sfmed.core.atomic import atomic_file
from sfmed.core.errors import UserError
from sfmed.data.dedup import ExactDedup, NearDedup
from sfmed.data.indexed import BulkIndexedWriter, optimal_dtype, remove_outputs
from sfmed.data.metadata import (
    cached_tokenizer_hash,
    tokenizer_hash,
    write_sidecar,
)
from sfmed.data.plan import (
    Gate,
    Source,
    choose_workers,
    fingerprints,
    output_prefix,
    resolve_sources,
    reusable,
    tasks,
    worker_spec,
)
from sfmed.data.report import build_report, empty_stats, merge_previous, write_report
from sfmed.data.tokenizer import load_tokenizer
from sfmed.data.worker import (
    TaskResult,
    WorkerContext,
    init_process,
    run_task,
    set_context,
)

__all__ = [
    "MalformedInputError",
    "OutputLockedError",
    "SourceRejectedError",
    "output_prefix",
    "preprocess",
    "resolve_sources",
]

logger = logging.getLogger(__name__)

PIPELINE_VERSION = 1
AUTO_PROCESS_MIN_BYTES = 256 << 20


class MalformedInputError(UserError, ValueError):
    """strict=true and a record could not be parsed or decoded."""


class OutputLockedError(UserError, RuntimeError):
    """Another preprocessing run is writing into the same output folder."""


class SourceRejectedError(UserError):
    """A source yielded no documents, or too many of its records were malformed/undecodable.

    ``stats`` holds the statistics of the sources handled so far (the rejected one included,
    with ``rejected`` set), so the report can still be written.
    """

    def __init__(self, message: str, stats: dict[str, dict]):
        super().__init__(message)
        self.stats = stats


_REASON_FIX = {
    "malformed": "check the record layout against the reader and render options (text_field=, "
    "template=, fields=, render=); the sample above shows what a record lacks",
    "decode_error": "the files are not valid in encoding={enc}; set the encoding they are in "
    "(e.g. encoding=gb18030 or encoding=utf-16), or decode_errors=replace to keep the records "
    "with U+FFFD",
    "empty": "every rendered text is empty; check text_field=/template= against a record",
    "too_short": "the texts are shorter than cleaning.min_chars={min_chars}; lower it (per source: "
    "min_chars=) or check what text_field=/template= select",
    "too_long": "the texts are longer than cleaning.max_chars={max_chars}; raise it (0 = no limit)",
    "duplicate": "every document repeats one of an earlier source or of this one; drop the source "
    "or use dedup=none",
    "near_duplicate": "every document nearly repeats an earlier one; raise near_dedup.threshold or "
    "use dedup=exact",
}
_REASON_LABEL = {
    "malformed": "malformed",
    "decode_error": "undecodable (decode errors)",
    "empty": "empty",
    "too_short": "too short",
    "too_long": "too long",
    "duplicate": "duplicates",
    "near_duplicate": "near-duplicates",
}


def rejection(acc: _Accumulator, cfg: PreprocessConfig) -> str | None:
    """Why a finished source must not be written (None when it is fine).

    A source is refused when it kept no documents, or when more than ``max_malformed_share`` of
    its records were malformed or undecodable (a wrong field name or encoding, not bad lines).
    """
    s, st = acc.s, acc.stats
    read, kept = st["records_read"], st["records_kept"]
    dropped = st["dropped"]
    files = ", ".join(str(f) for f in s.files[:3]) + (" ..." if len(s.files) > 3 else "")
    if read == 0:
        size = sum(f.stat().st_size for f in s.files)
        return (
            f"source {s.name}: no records in {len(s.files)} file(s) ({size:,} bytes: {files}); "
            "check files=/input= and reader= (reader=text: text_mode=) — no outputs were written "
            "for it"
        )
    bad = dropped.get("malformed", 0) + dropped.get("decode_error", 0)
    reason = max(dropped, key=lambda k: dropped[k])
    fix = _REASON_FIX.get(reason, "check the source's options").format(
        enc=s.opts.encoding, min_chars=s.min_chars, max_chars=s.max_chars
    )
    detail = f"{_REASON_LABEL.get(reason, reason)} {dropped[reason]:,}"
    others = [f"{_REASON_LABEL.get(k, k)} {v:,}" for k, v in dropped.items() if v and k != reason]
    if others:
        detail += " (also " + ", ".join(others) + ")"
    if acc.samples and reason in ("malformed", "decode_error"):
        detail += f", e.g. {acc.samples[0]}"
    if kept == 0:
        return (
            f"source {s.name}: 0 of {read:,} records kept; dropped as {detail}. Fix: {fix}. No "
            "outputs were written for it"
        )
    share = bad / read
    if share > cfg.max_malformed_share:
        return (
            f"source {s.name}: {bad:,} of {read:,} records ({share:.1%}) are malformed or "
            f"undecodable, above max_malformed_share={cfg.max_malformed_share}; dropped as "
            f"{detail}. Fix: {fix}; or accept the loss with max_malformed_share="
            f"{min(1.0, round(share + 0.05, 2))} (1 turns the check off). No outputs were written "
            "for it"
        )
    return None


class _Accumulator:
    """Per-source state in the main process while its results arrive."""

    def __init__(self, s: Source, dtype, cfg: PreprocessConfig):
        self.s = s
        self.stats = empty_stats()
        self.stats["files"] = len(s.files)
        self.samples: list[str] = []
        self.line_base: dict[int, int] = {}
        remove_outputs(s.prefix)
        self.writer = BulkIndexedWriter(s.prefix, dtype)
        self.kept_hashes: list[np.ndarray] = []
        self.kept_sigs: list[np.ndarray] = []
        self.cfg = cfg


def _loc(acc: _Accumulator, r: TaskResult, loc: Any) -> str:
    f = acc.s.files[r.file_idx]
    if isinstance(loc, int):
        return f"{f}:{acc.line_base.get(r.file_idx, 0) + loc}"
    return f"{f}{loc if str(loc).startswith('#') else ' ' + str(loc)}"


def _consume(acc: _Accumulator, r: TaskResult, exact: ExactDedup | None, near: NearDedup | None):
    st = acc.stats
    for loc, msg in r.errors:
        where = _loc(acc, r, loc)
        if acc.cfg.strict:
            raise MalformedInputError(
                f"{where}: {msg} (source {acc.s.name}; strict=true makes this fatal, strict=false "
                "counts and skips such records)"
            )
        if len(acc.samples) < acc.cfg.samples:
            acc.samples.append(f"{where}: {msg}")
    acc.line_base[r.file_idx] = acc.line_base.get(r.file_idx, 0) + r.n_lines
    st["records_read"] += r.counts["read"]
    st["invalid_bytes"] += r.invalid_bytes
    for k, v in r.counts.items():
        if k != "read":
            st["dropped"][k] += v
    n = len(r.lengths)
    keep = np.ones(n, dtype=bool)
    if exact is not None and n:
        keep = exact.keep_mask(r.hashes)
        st["dropped"]["duplicate"] += int(n - keep.sum())
    if near is not None and n:
        before = int(keep.sum())
        keep = near.keep_mask(r.sigs, keep)
        st["dropped"]["near_duplicate"] += before - int(keep.sum())
    if keep.all():
        ids, lengths = r.ids, r.lengths
    else:
        ids, lengths = r.ids[np.repeat(keep, r.lengths)], r.lengths[keep]
    if exact is not None:
        acc.kept_hashes.append(r.hashes[keep])
    if near is not None:
        acc.kept_sigs.append(r.sigs[keep])
    if len(lengths):
        acc.writer.add_chunk(ids, lengths)
    st["records_kept"] += int(len(lengths))


def _finish(acc: _Accumulator, tok_info, cfg: PreprocessConfig, dtype) -> dict:
    s, st = acc.s, acc.stats
    acc.writer.finish()
    st["documents"] = acc.writer.documents
    st["tokens"] = acc.writer.tokens
    if cfg.dedup != "none":
        arrays = {
            "hashes": np.concatenate(acc.kept_hashes) if acc.kept_hashes else np.zeros(0, np.uint64)
        }
        if cfg.dedup == "near":
            num_perm = cfg.near_dedup.num_perm
            arrays["sigs"] = (
                np.concatenate(acc.kept_sigs)
                if acc.kept_sigs
                else np.zeros((0, num_perm), np.uint32)
            )
        with atomic_file(f"{s.prefix}.dedup.npz", "wb") as f:
            np.savez(f, **arrays)
    st["malformed_samples"] = acc.samples
    meta = {
        "source": s.name,
        "group": s.group,
        "fingerprint": s.fingerprint,
        "tokenizer": tok_info.as_dict(),
        "dtype": np.dtype(dtype).name,
        "documents": acc.writer.documents,
        "tokens": acc.writer.tokens,
        "bin_bytes": acc.writer.bin_bytes,
        "idx_bytes": acc.writer.idx_bytes,
        "files": [str(f) for f in s.files],
        "settings": {"clean": cfg.clean, "dedup": cfg.dedup, "strict": cfg.strict},
        "stats": st,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_sidecar(s.prefix, meta)
    return st


@contextlib.contextmanager
def _lock(output_dir: Path):
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / ".preprocess.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputLockedError(
                f"another launch/preprocess.py run is writing to {output_dir}; wait for it or "
                "choose another output_dir"
            ) from None
        yield


def preprocess(cfg: PreprocessConfig) -> dict[str, Any]:
    """Run the pipeline; return the report (also written to ``report.json``/``report.md``).
    ``format=sft|preference`` runs the chat pipeline (:mod:`sfmed.data.chat.preprocess`)."""
    if cfg.format != "pretrain":
        from sfmed.data.chat.preprocess import preprocess_chat

        return preprocess_chat(cfg)
    t0, start = time.perf_counter(), time.time()
    sources = resolve_sources(cfg)
    out_dir = Path(cfg.output_dir)
    with _lock(out_dir):
        tok = load_tokenizer(cfg.tokenizer, cfg.tokenizer_backend, cfg.eod_token, with_hash=False)
        info = tok.info
        if info.fallback_reason:
            logger.warning(
                "tokenizer: gigatoken unsupported (%s); using %s",
                info.fallback_reason,
                info.backend,
            )
        dtype = optimal_dtype(info.vocab_size)
        fingerprints(cfg, sources, info, dtype)
        for s in sources:
            s.reuse = None if cfg.force else reusable(s, cfg.dedup)
            if s.reuse is not None:
                logger.info("%s: outputs complete and up to date, reused", s.name)
        workers = choose_workers(cfg, sources)
        run_id = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start))
        run_id += f".{int(start * 1000) % 1000:03d}"
        try:
            stats = _run(cfg, sources, tok, dtype, workers, run_id)
        except SourceRejectedError as e:
            stats, rejected = e.stats, e
        else:
            rejected = None
        settings = {
            "run": run_id,
            "tokenizer": info.as_dict(),
            "clean": cfg.clean,
            "cleaning": dataclasses.asdict(cfg.cleaning) if cfg.clean else None,
            "dedup": cfg.dedup,
            "near_dedup": dataclasses.asdict(cfg.near_dedup) if cfg.dedup == "near" else None,
            "strict": cfg.strict,
            "workers": workers,
            "output_dir": str(out_dir),
            "dtype": np.dtype(dtype).name,
            "elapsed_s": round(time.perf_counter() - t0, 3),
        }
        report = merge_previous(out_dir, build_report(stats, settings))
        write_report(out_dir, report)
    if rejected is not None:
        raise rejected
    return report


def _run(cfg, sources: list[Source], tok, dtype, workers: int, run_id: str) -> dict[str, dict]:
    """Stream the tasks through the workers, consume results in order, write each source."""
    specs = [worker_spec(cfg, s) for s in sources]
    ctx = WorkerContext(
        tokenizer_path=cfg.tokenizer,
        backend=tok.info.backend,
        eod_token=tok.info.eod_token,
        dtype=np.dtype(dtype).name,
        sources=specs,
        max_errors=max(cfg.samples, 1),
        tokenizer=tok,
    )
    set_context(ctx)
    exact = ExactDedup() if cfg.dedup != "none" else None
    near = None
    if cfg.dedup == "near":
        n = cfg.near_dedup
        near = NearDedup(n.threshold, n.num_perm, n.seed)

    window = 2 * max(workers, 2) + 1
    gate = Gate(window)
    if workers <= 1:
        # In-process: two threads overlap reading/parsing (GIL) with the Rust tokenizer, which
        # releases the GIL and uses every core itself.
        pool = ThreadPool(2)
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(workers, initializer=init_process, initargs=(ctx,))
    results = pool.imap(run_task, tasks(sources, cfg, gate, workers))
    # The canonical tokenizer hash (for blends) parses the whole tokenizer.json unless cached:
    # compute it while the first chunks are encoded (after the fork of any worker processes).
    tok.info.hash = tok.info.hash or cached_tokenizer_hash(tok.info.file_digest)
    hasher = ThreadPool(1)
    canonical = hasher.apply_async(tokenizer_hash, (cfg.tokenizer,)) if not tok.info.hash else None
    hasher.close()
    stats: dict[str, dict] = {}
    acc: _Accumulator | None = None
    progress = _progress(sources)
    try:
        for s in sources:
            if s.reuse is not None:
                st = dict(s.reuse.get("stats") or empty_stats())
                st.update(name=s.name, group=s.group, prefix=str(s.prefix), reused=True)
                stats[s.name] = st
                _load_dedup_state(s, exact, near)
                continue
            acc = _Accumulator(s, dtype, cfg)
            while True:
                r = next(results)
                gate.release()
                _consume(acc, r, exact, near)
                if progress is not None:
                    progress.update(r.nbytes)
                if r.last:
                    break
            problem = rejection(acc, cfg)
            if problem is not None:
                acc.writer.abort()
                remove_outputs(s.prefix)
                st = acc.stats
                st["malformed_samples"] = acc.samples
                st.update(name=s.name, group=s.group, prefix=str(s.prefix), reused=False)
                st["rejected"], st["run"] = problem, run_id
                stats[s.name] = st
                acc = None
                raise SourceRejectedError(problem, stats)
            if tok.info.hash is None:
                tok.info.hash = canonical.get()
            acc.stats["run"] = run_id
            st = _finish(acc, tok.info, cfg, dtype)
            acc = None
            st.update(name=s.name, group=s.group, prefix=str(s.prefix), reused=False)
            stats[s.name] = st
            logger.info(
                "%s: %d records read, %d kept, %d tokens",
                s.name,
                st["records_read"],
                st["records_kept"],
                st["tokens"],
            )
        pool.close()
        if tok.info.hash is None:
            tok.info.hash = canonical.get()
    except BaseException:
        if acc is not None:
            acc.writer.abort()
        gate.stop()
        pool.terminate()
        raise
    finally:
        if progress is not None:
            progress.close()
        pool.join()
        hasher.join()
    return stats


def _load_dedup_state(s: Source, exact: ExactDedup | None, near: NearDedup | None) -> None:
    if exact is None:
        return
    with np.load(f"{s.prefix}.dedup.npz") as z:
        exact.add(z["hashes"])
        if near is not None and "sigs" in z:
            near.add(z["sigs"])


def _progress(sources: list[Source]):
    """A byte progress bar on an interactive terminal (tqdm is not even imported otherwise:
    its import costs more than preprocessing a small corpus)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    total = sum(f.stat().st_size for s in sources if s.reuse is None for f in s.files)
    return tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", leave=False)
