"""``launch/preprocess.py format=sft|preference``: sources -> chat datasets + report.

Per source: read the records (the pretraining readers), extract turns (:mod:`.turns`), check and
encode them in batches (:mod:`.encode`), handle over-long conversations, pack (:mod:`.pack`) and
write ``<output_dir>/<source>_sft`` or ``<source>_preference`` (:mod:`.store`). The report
(``<kind>_report.json/.md`` in ``output_dir``) has, per source, records, turns, tokens,
supervised tokens, truncated, dropped and why, and the packing efficiency.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from sfmed.config.data import PreprocessConfig
from sfmed.core.atomic import atomic_write_text
from sfmed.core.errors import UserError
from sfmed.data.chat.encode import ChatEncoder, Encoded
from sfmed.data.chat.formats import Turn, resolve_format
from sfmed.data.chat.pack import pack_bfd, packing_stats
from sfmed.data.chat.store import ChatWriter, complete_meta, remove_chat_outputs
from sfmed.data.chat.turns import PAIR_REASONS, SFT_REASONS, BadRecord, make_pairs, make_turns
from sfmed.data.indexed import optimal_dtype
from sfmed.data.io import read_all
from sfmed.data.metadata import config_hash
from sfmed.data.readers import Malformed, read_csv, read_json, read_jsonl, read_parquet
from sfmed.data.tokenizer import reference_encoder

logger = logging.getLogger(__name__)


class BadChatRecordError(UserError, ValueError):
    """strict=true and a record or pair cannot be used."""


class NothingKeptError(UserError):
    """A chat source kept no conversation (or pair): every record was dropped."""


# What to change when every record of a source is dropped for one reason.
_NOTHING_KEPT_FIX = {
    "too_long": "raise chat.seq_length, or chat.overflow=truncate to cut what does not fit",
    "prompt_too_long": "raise chat.seq_length: each pair's prompt alone does not fit",
    "same_after_truncation": "raise chat.seq_length: truncation leaves chosen equal to rejected",
    "malformed": "check the record layout (messages/conversations, question/response_*, "
    "prompt/chosen/rejected) against the samples in the report",
}


def _check_kept(src: _Source, kind: str) -> None:
    """Refuse a source that kept nothing: a dataset with no sample would only fail in training."""
    if src.items:
        return
    dropped = {r: n for r, n in src.st["dropped"].items() if n}
    if not dropped:
        raise NothingKeptError(f"{src.name}: no records found; check input= and reader=")
    top = max(dropped, key=dropped.get)
    fix = _NOTHING_KEPT_FIX.get(top, "see the samples above for what each record lacks")
    samples = "".join(f"\n  {x}" for x in src.st["samples"][:3])
    unit = "pairs" if kind == "preference" else "conversations"
    raise NothingKeptError(
        f"{src.name}: all {src.st['records']} records were dropped, no {unit} kept "
        f"(dropped: {dropped}); {fix}. Nothing was written for this source.{samples}"
    )


class ChatEncodingMismatch(RuntimeError):
    """verify_tokenizer found a conversation whose ids differ from the reference encoding."""


class _Verifier:
    """``verify_tokenizer=N``: the first N conversations of a source (N pairs' sides) are
    re-encoded with the reference tokenizer: an HF tokenizer encodes the rendered string (it
    splits special tokens as ``apply_chat_template`` does); a SentencePiece model, which has no
    such splitting, encodes each text piece and takes each special token's id, as the formats'
    reference code does. Any difference stops the run."""

    def __init__(self, n: int, enc: ChatEncoder, tokenizer: str):
        self.left, self.enc = n, enc
        self.ref = reference_encoder(tokenizer) if n else None
        self.by_piece = enc.tok.info.kind == "sentencepiece"

    def _reference(self, turns: list[Turn]) -> list[int]:
        if not self.by_piece:
            return self.ref(self.enc.fmt.render(turns))
        out: list[int] = []
        for g in self.enc.fmt.pieces(turns, [False] * len(turns)):
            for p in g:
                out.extend([self.enc.special_ids[p.text]] if p.special else self.ref(p.text))
        return out

    def check(self, where: str, turns: list[Turn], ids: np.ndarray) -> None:
        if self.left <= 0:
            return
        self.left -= 1
        want = self._reference(turns)
        if want != ids.tolist():
            raise ChatEncodingMismatch(
                f"{where}: the chat encoding differs from the reference tokenizer's ids of the "
                f"rendered conversation ({len(ids)} vs {len(want)} tokens); please report it"
            )


def chat_prefix(output_dir: str | Path, name: str, kind: str) -> Path:
    """``<output_dir>/<name>_sft`` or ``<output_dir>/<name>_preference``."""
    return Path(output_dir) / f"{name}_{kind}"


def iter_records(path: Path, fmt: str, opts) -> Any:
    """``(location, record)`` of a whole file with the pretraining readers."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for rg in range(pq.ParquetFile(path).metadata.num_row_groups):
            for loc, rec, _ in read_parquet(str(path), rg, None):
                yield f"{path} {loc}", rec
        return
    data = read_all(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    enc = opts.encoding
    if fmt == "jsonl":
        items = read_jsonl(data, enc)
    elif fmt == "json":
        items = read_json(data, enc, opts.json_key)
    elif fmt in ("csv", "tsv"):
        delim = opts.csv_delimiter or ("\t" if fmt == "tsv" else ",")
        items = read_csv(data, enc, delim, opts.csv_columns)
    else:
        raise UserError(f"{path}: reader {fmt!r} gives no structured records for chat data")
    for loc, rec, _ in items:
        yield (f"{path}:{loc}" if isinstance(loc, int) else f"{path}{loc}"), rec


class _Source:
    """Counts and encoded sequences of one source while it is processed."""

    def __init__(self, name: str, group: str, reasons: tuple[str, ...], cfg: PreprocessConfig):
        self.name, self.group, self.cfg = name, group, cfg
        self.st: dict[str, Any] = {
            "name": name,
            "group": group,
            "records": 0,
            "kept": 0,
            "turns": 0,
            "assistant_turns": 0,
            "tokens": 0,
            "supervised_tokens": 0,
            "truncated": 0,
            "dropped": dict.fromkeys(reasons, 0),
            "samples": [],
        }
        self.items: list[list[tuple[np.ndarray, np.ndarray]]] = []  # packing units
        self.item_tokens: list[int] = []
        self.item_supervised: list[int] = []

    def bad(self, where: str, reason: str, msg: str) -> None:
        if self.cfg.strict:
            raise BadChatRecordError(
                f"{where}: {msg} ({reason}; source {self.name}; strict=true makes this fatal, "
                "strict=false counts and skips it)"
            )
        self.st["dropped"][reason] = self.st["dropped"].get(reason, 0) + 1
        if len(self.st["samples"]) < self.cfg.samples:
            self.st["samples"].append(f"{where}: {reason}: {msg}")

    def keep(self, seqs: list[Encoded], dtype) -> None:
        self.items.append([(e.ids.astype(dtype), e.mask) for e in seqs])
        self.item_tokens.append(sum(len(e) for e in seqs))
        self.item_supervised.append(sum(int(np.count_nonzero(e.mask)) for e in seqs))

    def totals(self) -> None:
        self.st["kept"] = len(self.items)
        self.st["tokens"] = int(sum(self.item_tokens))
        self.st["supervised_tokens"] = int(sum(self.item_supervised))


def _write(src: _Source, prefix: Path, kind: str, dtype, meta: dict) -> None:
    cap = src.cfg.chat.seq_length
    src.totals()
    lengths = np.array(src.item_tokens, np.int64)
    sup = np.array(src.item_supervised, np.int64)
    if src.cfg.chat.pack:
        groups = pack_bfd(lengths, cap) if len(lengths) else []
    else:
        groups = [[i] for i in range(len(lengths))]
    w = ChatWriter(prefix, dtype)
    try:
        for g in groups:
            seqs = [s for i in g for s in src.items[i]]
            w.add_sample([s[0] for s in seqs], [s[1] for s in seqs])
        pk = packing_stats(
            np.array([lengths[g].sum() for g in groups]),
            np.array([sup[g].sum() for g in groups]),
            cap,
        )
        src.st["packing"] = {"packed": src.cfg.chat.pack, **pk}
        w.finish({**meta, "kind": kind, "stats": src.st})
    except BaseException:
        w.abort()
        raise


def preprocess_chat(cfg: PreprocessConfig) -> dict[str, Any]:
    """Run ``format=sft|preference``; return the report (also written to
    ``<output_dir>/<format>_report.json/.md``)."""
    from sfmed.data.plan import resolve_sources
    from sfmed.data.preprocess import _lock
    from sfmed.data.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    kind = cfg.format
    sources = resolve_sources(cfg)
    c = cfg.chat
    extractors = [(make_turns if kind == "sft" else make_pairs)(s.opts) for s in sources]
    out_dir = Path(cfg.output_dir)
    with _lock(out_dir):
        tok = load_tokenizer(cfg.tokenizer, cfg.tokenizer_backend, cfg.eod_token)
        fmt = resolve_format(c.template, cfg.tokenizer, tok)
        enc = ChatEncoder(
            tok,
            fmt,
            mask=c.mask,
            system_prompt=c.system_prompt,
            require_alternation=c.require_alternation,
            tokenizer_path=cfg.tokenizer,
        )
        dtype = optimal_dtype(tok.info.vocab_size)
        meta = {
            "seq_length": c.seq_length,
            "chat_template": fmt.name,
            "mask": c.mask,
            "overflow": c.overflow,
            "system_prompt": c.system_prompt if c.system_prompt is not None else fmt.default_system,
            "tokenizer": tok.info.as_dict(),
            "dtype": np.dtype(dtype).name,
        }
        stats: dict[str, dict] = {}
        for s, extract in zip(sources, extractors, strict=True):
            prefix = chat_prefix(out_dir, s.name, kind)
            fp = _fingerprint(cfg, s, tok.info.file_digest)
            old = None if cfg.force else complete_meta(prefix)
            if old is not None and old.get("fingerprint") == fp:
                logger.info("%s: outputs complete and up to date, reused", s.name)
                stats[s.name] = {**old["stats"], "reused": True}
                continue
            reasons = SFT_REASONS if kind == "sft" else PAIR_REASONS
            src = _Source(s.name, s.group, reasons, cfg)
            run = _run_sft if kind == "sft" else _run_pairs
            run(src, s, extract, enc, dtype, _Verifier(cfg.verify_tokenizer, enc, cfg.tokenizer))
            if not src.items:
                remove_chat_outputs(prefix)  # an older output must not pass for this run's
                _check_kept(src, kind)
            src.st["prefix"] = str(prefix)
            src.st["reused"] = False
            files = [str(f) for f in s.files]
            _write(
                src,
                prefix,
                kind,
                dtype,
                {**meta, "source": s.name, "files": files, "fingerprint": fp},
            )
            stats[s.name] = src.st
            logger.info(
                "%s: %d records, %d kept, %d tokens",
                s.name,
                src.st["records"],
                src.st["kept"],
                src.st["tokens"],
            )
        report = {
            "format": kind,
            "settings": {
                **meta,
                "strict": cfg.strict,
                "output_dir": str(out_dir),
                "elapsed_s": round(time.perf_counter() - t0, 3),
            },
            "sources": stats,
            "total": _total(stats),
        }
        atomic_write_text(out_dir / f"{kind}_report.json", _json(report))
        atomic_write_text(out_dir / f"{kind}_report.md", render_chat_markdown(report))
    return report


CHAT_PIPELINE_VERSION = 1


def _fingerprint(cfg: PreprocessConfig, s, tokenizer_digest: str) -> str:
    """What decides a source's outputs: reading, chat settings, input files, tokenizer."""
    chat = dataclasses.asdict(cfg.chat)
    chat.pop("batch_size")  # does not change the outputs
    return config_hash(
        {
            "version": CHAT_PIPELINE_VERSION,
            "format": cfg.format,
            "name": s.name,
            "reader": s.opts.reader_options(),
            "turns": dataclasses.asdict(s.opts.turns),
            "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in s.files],
            "chat": chat,
            "tokenizer": tokenizer_digest,
            "strict": cfg.strict,
        }
    )


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False, indent=1)


def _records(src: _Source, s):
    for f, fmt in zip(s.files, s.formats, strict=True):
        for where, rec in iter_records(f, fmt, s.opts):
            src.st["records"] += 1
            if isinstance(rec, Malformed):
                src.bad(where, "malformed", rec.msg)
                continue
            yield where, rec


def _run_sft(src: _Source, s, extract, enc: ChatEncoder, dtype, verify: _Verifier) -> None:
    c = src.cfg.chat

    def encode(batch: list[tuple[str, list[Turn]]]):
        convs = [t for _, t in batch]
        return enc.encode(convs, [enc.train_flags(t) for t in convs])

    def consume(batch: list[tuple[str, list[Turn]]], encoded: list[Encoded]) -> None:
        for (where, turns), e in zip(batch, encoded, strict=True):
            fit = e if len(e) <= c.seq_length else None
            if fit is None and c.overflow == "truncate":
                fit = enc.fit(turns, e, c.seq_length)
                if fit is not None:
                    src.st["truncated"] += 1
                    turns = turns[: len(fit.turn_ends)]
            if fit is None:
                src.bad(where, "too_long", f"{len(e)} tokens > chat.seq_length={c.seq_length}")
                continue
            verify.check(where, turns, fit.ids)
            src.st["turns"] += sum(t.role != "system" for t in turns)
            src.st["assistant_turns"] += sum(t.role == "assistant" for t in turns)
            src.keep([fit], dtype)

    def items():
        for where, rec in _records(src, s):
            try:
                yield where, enc.prepare(extract(rec))
            except BadRecord as e:
                src.bad(where, e.reason, str(e))

    _pipeline(items(), c.batch_size, encode, consume)


def _pipeline(items, batch_size: int, encode, consume) -> None:
    """Batches of ``items`` through ``encode`` in a worker thread while the next batch is read
    and prepared here (the tokenizer releases the GIL), consumed in order."""
    from concurrent.futures import ThreadPoolExecutor

    pending: list = []
    with ThreadPoolExecutor(1) as pool:
        try:
            batch: list = []
            for it in items:
                batch.append(it)
                if len(batch) >= batch_size:
                    pending.append((batch, pool.submit(encode, batch)))
                    batch = []
                    if len(pending) > 1:
                        b, f = pending.pop(0)
                        consume(b, f.result())
            if batch:
                pending.append((batch, pool.submit(encode, batch)))
            while pending:
                b, f = pending.pop(0)
                consume(b, f.result())
        except BaseException:
            for _, f in pending:
                f.cancel()
            raise


def _answer_budget(prompt: int, a: int, b: int, limit: int, pair_limit: int | None):
    """Tokens each answer part may keep: each side within ``limit``; with packing the pair
    within ``pair_limit`` (the shorter answer is kept whole when it fits in half)."""
    ka, kb = min(a, limit - prompt), min(b, limit - prompt)
    if pair_limit is not None and 2 * prompt + ka + kb > pair_limit:
        room = pair_limit - 2 * prompt
        short = min(ka, kb)
        if short <= room // 2:
            ka, kb = (ka, room - ka) if ka <= kb else (room - kb, kb)
        else:
            ka = kb = room // 2
    return ka, kb


def _run_pairs(src: _Source, s, extract, enc: ChatEncoder, dtype, verify: _Verifier) -> None:
    c = src.cfg.chat
    pair_limit = c.seq_length if c.pack else None

    def encode(batch: list[tuple[str, list[Turn], str, str]]):
        convs, flags = [], []
        for _, prompt, ch, rj in batch:
            for ans in (ch, rj):
                convs.append([*prompt, Turn("assistant", ans)])
                flags.append([False] * len(prompt) + [True])
        return convs, enc.encode(convs, flags)

    def consume(batch: list[tuple[str, list[Turn], str, str]], encoded) -> None:
        convs, encs = encoded
        for k, (where, prompt, _, _) in enumerate(batch):
            ec, er = encs[2 * k], encs[2 * k + 1]
            p = int(ec.turn_ends[len(prompt) - 1])
            a, b = len(ec) - p, len(er) - p
            ka, kb = _answer_budget(p, a, b, c.seq_length, pair_limit)
            if (ka < a or kb < b) and c.overflow == "drop":
                src.bad(where, "too_long", f"pair of {len(ec)}+{len(er)} tokens is too long")
                continue
            if ka <= 0 or kb <= 0 or not ec.mask[p : p + ka].any() or not er.mask[p : p + kb].any():
                src.bad(
                    where,
                    "prompt_too_long",
                    f"prompt of {p} tokens leaves no answer within chat.seq_length",
                )
                continue
            if ka == a and kb == b:  # whole sides: their rendered text is known
                for conv, e in zip(convs[2 * k : 2 * k + 2], (ec, er), strict=True):
                    verify.check(where, conv, e.ids)
            if ka < a or kb < b:
                src.st["truncated"] += 1
                ec, er = ec.cut(p + ka), er.cut(p + kb)
                if np.array_equal(ec.ids, er.ids):
                    src.bad(
                        where, "same_after_truncation", "both answers truncated to the same tokens"
                    )
                    continue
            src.st["turns"] += 2 * sum(t.role != "system" for t in prompt) + 2
            src.st["assistant_turns"] += 2
            src.keep([ec, er], dtype)

    def items():
        for where, rec in _records(src, s):
            try:
                prompt, ch, rj = extract(rec)
                if not ch or not rj:
                    raise BadRecord("empty_side", "empty chosen or rejected answer")
                if ch == rj:
                    raise BadRecord("identical", "chosen and rejected are identical")
                for x in (ch, rj):
                    for sp in enc.fmt.specials:
                        if sp in x:
                            raise BadRecord("special_token", f"an answer contains {sp!r}")
                yield where, enc.prepare(prompt, final="user"), ch, rj
            except BadRecord as e:
                src.bad(where, e.reason, str(e))

    _pipeline(items(), c.batch_size, encode, consume)


def _total(stats: dict[str, dict]) -> dict[str, Any]:
    keys = (
        "records",
        "kept",
        "turns",
        "assistant_turns",
        "tokens",
        "supervised_tokens",
        "truncated",
    )
    tot: dict[str, Any] = dict.fromkeys(keys, 0)
    dropped: Counter = Counter()
    packs = cap = 0
    for st in stats.values():
        for k in keys:
            tot[k] += st[k]
        dropped.update(st["dropped"])
        packs += st["packing"]["packs"]
        cap += st["packing"]["capacity"]
    tot["dropped"] = dict(dropped)
    tot["packing"] = {
        "packs": packs,
        "capacity": cap,
        "efficiency": tot["tokens"] / cap if cap else 0.0,
        "supervised_fraction": tot["supervised_tokens"] / cap if cap else 0.0,
    }
    return tot


def render_chat_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (per source and total)."""
    unit = "pairs" if report["format"] == "preference" else "conversations"
    head = (
        f"| source | records | {unit} | turns | tokens | supervised | truncated | dropped | "
        "samples | packing |"
    )
    lines = [f"# {report['format']} data", "", head, "|" + "---|" * 10]

    def row(name: str, st: dict) -> str:
        d = ", ".join(f"{k} {v}" for k, v in st["dropped"].items() if v) or "0"
        pk = st["packing"]
        return (
            f"| {name} | {st['records']} | {st['kept']} | {st['turns']} | {st['tokens']} | "
            f"{st['supervised_tokens']} | {st['truncated']} | {d} | {pk['packs']} | "
            f"{100 * pk['efficiency']:.1f}% ({100 * pk['supervised_fraction']:.1f}% sup.) |"
        )

    for name, st in report["sources"].items():
        lines.append(row(name + (" (reused)" if st.get("reused") else ""), st))
    lines.append(row("**total**", report["total"]))
    st = report["settings"]
    lines += [
        "",
        f"seq_length {st['seq_length']}, template {st['chat_template']}, mask "
        f"{st['mask']}, overflow {st['overflow']}, {st['elapsed_s']} s",
    ]
    samples = [x for s in report["sources"].values() for x in s["samples"]]
    if samples:
        lines += ["", "Dropped (samples):", ""] + [f"- {x}" for x in samples]
    return "\n".join(lines) + "\n"
