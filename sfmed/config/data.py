"""Schema of ``launch/preprocess.py``: sources (files, reader, rendering) -> indexed datasets.

YAML under ``conf/`` only sets values (``conf/preprocess.yaml``, one file per corpus under
``conf/sources/``). :func:`register` stores the schema in Hydra's ConfigStore; library code
and tests use these dataclasses without Hydra. Validation runs in ``__post_init__`` (Hydra's
``OmegaConf.to_object`` calls it), so bad values fail before any work starts.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfmed.config.sft_data import FORMATS, ChatDataConfig, ChatOptions
from sfmed.core.errors import ConfigError, Problems

READERS = ("auto", "text", "jsonl", "json", "csv", "tsv", "parquet")
RENDERS = ("field", "template", "history", "dialogue", "mcq")
TEXT_MODES = ("file", "paragraph", "line")
DECODE_ERRORS = ("drop", "replace")
DEDUP_MODES = ("none", "exact", "near")
UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD", "none")
BACKENDS = ("auto", "gigatoken", "hf", "sentencepiece")


@dataclass
class ReaderOptions:
    """How the records of a corpus are read and rendered into pretraining text."""

    reader: str = "auto"
    """text | jsonl | json (array, object with a list under ``json_key``, or JSON lines) | csv |
    tsv | parquet | auto (from the extension; ``.gz``/``.zst`` are decompressed)."""

    encoding: str = "utf-8"
    """Text encoding of the files, e.g. ``gb18030`` for Chinese medical dumps."""

    decode_errors: str = "drop"
    """Records with bytes invalid in ``encoding``: ``drop`` them (reason ``decode_error``) or
    ``replace`` the bytes with U+FFFD and keep them. Invalid bytes are counted either way."""

    text_mode: str = "file"
    """text reader: one document per ``file``, per blank-line separated ``paragraph``, or per
    ``line``."""

    text_field: str = "text"
    """render=field: the record field holding the text (dotted path for nested objects)."""

    json_key: str | None = None
    """json reader: dotted key of the record list inside a top-level object (e.g. ``data``)."""

    csv_delimiter: str | None = None
    """csv/tsv: field delimiter (default ``,`` / tab)."""

    csv_columns: list[str] | None = None
    """csv/tsv: column names for files without a header row."""

    render: str = "field"
    """How a record becomes text: ``field`` (one field as is), ``template`` (fields into a
    template), ``history`` (``history: [[q, a], ...]`` + last turn, CMtMedQA), ``dialogue``
    (a list of messages: ``[{role, content}]`` or ShareGPT ``[{from, value}]``), ``mcq``
    (question + options + answer + explanation)."""

    template: Any = None
    """template/history/mcq: a template string with ``{name}`` placeholders, or a list of parts
    joined by ``join`` (a part whose placeholders are all empty is left out)."""

    join: str = "\n"
    """Separator between template parts, dialogue turns and options."""

    fields: Any = None
    """Placeholder/role name -> record key (dotted path), e.g. ``{q: ask, a: answer}`` or
    ``{q: 问}``. Names not listed map to the key of the same name. (Typed ``Any`` so that the
    command line can set the whole mapping, ``fields={q: '问'}``: a typed dict would be a closed
    struct that refuses new keys.)"""

    required: list[str] | None = None
    """Names whose record key must be present (a record without one is ``malformed``); default:
    every name the template uses."""

    roles: Any = None
    """dialogue: role -> text prefix (``null`` leaves that role's messages out). Merged over the
    defaults user/human -> ``问：``, assistant/gpt -> ``答：``, system -> ``''``."""

    option_keys: list[str] | None = None
    """mcq: record keys of the options when they are separate columns (e.g. ``[A, B, C, D]``)."""

    min_chars: int | None = None
    """Per-source override of ``cleaning.min_chars``."""

    max_chars: int | None = None
    """Per-source override of ``cleaning.max_chars``."""

    turns: ChatOptions = field(default_factory=ChatOptions)
    """format=sft|preference: where the turns of a record are (see ``docs/sft.md``)."""

    def _validate_reader(self, where: str, p: Problems | None = None) -> None:
        """Record in ``p`` every problem of the reader/render options (keys prefixed ``where``);
        without ``p``, raise them (:class:`ConfigErrors`)."""
        if p is None:
            p = Problems()
            self._validate_reader(where, p)
            p.raise_if_any()
            return
        if isinstance(self.turns, dict):
            self.turns = ChatOptions(**self.turns)
        reader_ok = p.choice(f"{where}reader", self.reader, READERS)
        render_ok = p.choice(f"{where}render", self.render, RENDERS)
        p.choice(f"{where}text_mode", self.text_mode, TEXT_MODES)
        p.choice(f"{where}decode_errors", self.decode_errors, DECODE_ERRORS)
        import codecs

        try:
            codecs.lookup(self.encoding)
        except LookupError:
            p.add(
                f"{where}encoding={self.encoding!r} is not a codec Python knows; use e.g. utf-8, "
                "gb18030, utf-16"
            )
        if self.render == "template" and not self.template:
            p.add(f"{where}render=template needs {where}template='...{{name}}...'")
        if self.template is not None and not isinstance(self.template, (str, list, tuple)):
            p.add(f"{where}template must be a string or a list of strings")
        for k in ("fields", "roles"):
            v = getattr(self, k)
            if v is None:
                continue
            if not hasattr(v, "items") or not all(
                isinstance(key, str) and (isinstance(x, str) or (k == "roles" and x is None))
                for key, x in v.items()
            ):
                p.add(
                    f"{where}{k}={v!r} must map names to record keys, e.g. "
                    f"{k}={{q: question, a: answer}} (quote non-ASCII values: {k}={{q: '问'}})"
                )
        # Whether reader and render fit together is judged only when both are known values.
        if reader_ok and render_ok and self.reader == "text" and self.render != "field":
            p.add(
                f"{where}reader=text gives plain strings; render={self.render!r} needs structured "
                "records (jsonl/json/csv/parquet). Use render=field."
            )
        for k in ("min_chars", "max_chars"):
            v = getattr(self, k)
            if v is not None and v < 0:
                p.add(f"{where}{k}={v} must be >= 0 (0 disables the limit)")

    def reader_options(self) -> dict[str, Any]:
        """The reader/render options as a plain dict (hashed into the resume fingerprint)."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(ReaderOptions)}
        for k in ("fields", "roles"):  # unset and empty mean the same (stable fingerprints)
            out[k] = out[k] or {}
        if self.turns == ChatOptions():  # keeps the fingerprints of pretraining outputs unchanged
            del out["turns"]
        return out


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _plain(dataclasses.asdict(v))
    if isinstance(v, dict) or hasattr(v, "items"):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


@dataclass
class SourceConfig(ReaderOptions):
    """One corpus: its files and how to read them (one YAML under ``conf/sources/``)."""

    files: list[str] = field(default_factory=list)
    """Paths or globs (``**`` allowed); relative ones are taken from ``data_root``."""

    group: str = "other"
    """Report group, e.g. ``medical`` or ``general``."""

    description: str = ""
    """Free text for the report and docs (origin, license, layout)."""

    enabled: bool = True
    """false skips the source (e.g. a corpus you have not downloaded)."""

    example: Any = None
    """One record in the corpus's published layout (documentation; tests render it)."""

    def validate(self, name: str) -> None:
        """Raise ``ConfigErrors`` naming every bad ``sources.<name>.<key>`` at once."""
        p = Problems()
        self.collect_problems(name, p)
        p.raise_if_any()

    def collect_problems(self, name: str, p: Problems) -> None:
        """Record in ``p`` every problem of this source (keys named ``sources.<name>.<key>``)."""
        self._validate_reader(f"sources.{name}.", p)
        if self.enabled and not self.files:
            p.add(f"sources.{name}.files is empty; list the corpus files or globs")


@dataclass
class CleanConfig:
    """What ``clean=true`` does to each text (``clean=false`` writes texts exactly as read)."""

    unicode: str = "NFC"
    """Unicode normalisation: NFC (default, what Qwen2's tokenizer applies anyway) | NFKC (also
    folds full-width ASCII and ligatures; changes Chinese punctuation ，→,) | NFD | NFKD | none."""

    strip_html: bool = True
    """Remove HTML tags (``<p>``, ``<br/>`` in drug labels) and unescape entities (``&nbsp;``)."""

    whitespace: bool = True
    """Normalise line ends to ``\\n``, drop control and zero-width characters, collapse runs of
    spaces/tabs, strip line ends and the document, and cap blank lines at one."""

    min_chars: int = 10
    """Drop texts shorter than this many characters (reason ``too_short``); 0 keeps all."""

    max_chars: int = 0
    """Drop texts longer than this (reason ``too_long``); 0 = no limit."""

    def __post_init__(self):
        p = Problems()
        p.choice("cleaning.unicode", self.unicode, UNICODE_FORMS)
        for k in ("min_chars", "max_chars"):
            if getattr(self, k) < 0:
                p.add(f"cleaning.{k}={getattr(self, k)} must be >= 0")
        p.raise_if_any()


@dataclass
class NearDedupConfig:
    """MinHash/LSH near-duplicate removal (``dedup=near``; datasketch)."""

    threshold: float = 0.8
    """Estimated Jaccard similarity of character n-gram sets above which a text is a
    near-duplicate of an earlier one."""

    num_perm: int = 128
    ngram: int = 5
    """Character n-gram size of the shingles (Chinese has no word spaces)."""

    seed: int = 1

    def __post_init__(self):
        p = Problems()
        if not 0.0 < self.threshold < 1.0:
            p.add(f"near_dedup.threshold={self.threshold} must be in (0, 1)")
        if self.num_perm < 16:
            p.add(f"near_dedup.num_perm={self.num_perm} must be >= 16")
        if self.ngram < 1:
            p.add(f"near_dedup.ngram={self.ngram} must be >= 1")
        p.raise_if_any()


@dataclass
class PreprocessConfig(ReaderOptions):
    """Corpora -> ``<output_dir>/<source>_text_document.bin/.idx`` + ``report.md/json``.

    Either ``sources`` (named corpora, e.g. from ``conf/sources/``) or an ad-hoc single
    source: ``input=<file or glob>`` with the reader options at the top level.
    """

    tokenizer: str = "???"
    """An HF tokenizer folder (tokenizer.json) or a SentencePiece ``.model``."""

    output_dir: str = "???"

    input: str | None = None
    """Ad-hoc single source: a file or glob (relative to the working directory)."""

    name: str | None = None
    """Ad-hoc source name (default: the input file's stem)."""

    group: str = "other"
    """Ad-hoc source report group."""

    sources: dict[str, SourceConfig] = field(default_factory=dict)
    """Named sources, processed (and deduplicated: first occurrence wins) in this order."""

    data_root: str = "data/raw"
    """Base folder of relative ``files`` in sources."""

    tokenizer_backend: str = "auto"
    """auto (gigatoken where it supports the tokenizer, else HF tokenizers / sentencepiece) |
    gigatoken | hf | sentencepiece. All give ids identical to the reference tokenizer."""

    eod_token: str | None = None
    """Token appended after each document (default: ``<|endoftext|>`` if the vocabulary has it,
    else the tokenizer's eos token)."""

    clean: bool = True
    cleaning: CleanConfig = field(default_factory=CleanConfig)

    dedup: str = "exact"
    """none | exact (content hash, across all sources) | near (exact + MinHash/LSH)."""

    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)

    strict: bool = False
    """Make malformed records and undecodable bytes fatal (with file:line)."""

    max_malformed_share: float = 0.5
    """Refuse a source (exit 2, no outputs for it) when more than this share of its records are
    dropped as malformed or undecodable: that is a wrong field name, template or encoding, not
    a few bad lines. 1 turns the check off. A source that yields no documents at all is always
    refused."""

    workers: int = 0
    """Worker processes; 0 = auto (in-process with the Rust tokenizer's threads for small inputs
    or <= 4 cores, else one process per core); 1 = in-process."""

    chunk_mb: float = 32.0
    """Largest piece (MiB) line-based files are cut into for parallel work (smaller pieces are
    used for small inputs so that every worker gets several)."""

    force: bool = False
    """Redo every source even when its outputs are complete and up to date."""

    verify_tokenizer: int = 0
    """Per source, re-encode this many documents with the reference tokenizer (HF tokenizers /
    sentencepiece) and fail if any id differs; 0 = off."""

    samples: int = 5
    """Malformed-record samples (file:line: error) kept per source in the report."""

    format: str = "pretrain"
    """What is written: ``pretrain`` (documents + EOD) | ``sft`` (chat-encoded conversations with
    loss masks) | ``preference`` (chosen/rejected pairs); see ``docs/sft.md``."""

    chat: ChatDataConfig = field(default_factory=ChatDataConfig)
    """format=sft|preference: chat format, seq_length, mask mode, overflow, packing."""

    def __post_init__(self):
        p = Problems()
        p.choice("format", self.format, FORMATS)
        if isinstance(self.chat, dict):
            with p.collect():
                self.chat = ChatDataConfig(**self.chat)
        for k in ("tokenizer", "output_dir"):
            v = getattr(self, k)
            if not v or v == "???":
                p.add(f"{k} is not set; pass {k}=<path>")
        p.choice("dedup", self.dedup, DEDUP_MODES)
        p.choice("tokenizer_backend", self.tokenizer_backend, BACKENDS)
        if self.workers < 0:
            p.add(f"workers={self.workers} must be >= 0 (0 = auto)")
        if self.chunk_mb <= 0:
            p.add(f"chunk_mb={self.chunk_mb} must be > 0")
        if not 0.0 <= self.max_malformed_share <= 1.0:
            p.add(
                f"max_malformed_share={self.max_malformed_share} must be in [0, 1] (a share of "
                "the records read; 1 turns the check off)"
            )
        if self.verify_tokenizer < 0 or self.samples < 0:
            p.add("verify_tokenizer and samples must be >= 0")
        if isinstance(self.cleaning, dict):
            with p.collect():
                self.cleaning = CleanConfig(**self.cleaning)
        if isinstance(self.near_dedup, dict):
            with p.collect():
                self.near_dedup = NearDedupConfig(**self.near_dedup)
        self.sources = {
            str(k): (SourceConfig(**v) if isinstance(v, dict) else v)
            for k, v in (self.sources or {}).items()
        }
        if self.input:
            if self.sources:
                p.add(
                    "input= and sources are both given; run either one ad-hoc input or the "
                    "configured sources"
                )
            self._validate_reader("", p)
        else:
            defaults = ReaderOptions()
            changed = [
                f.name
                for f in dataclasses.fields(ReaderOptions)
                if _plain(getattr(self, f.name)) != _plain(getattr(defaults, f.name))
            ]
            if changed:
                p.add(
                    f"top-level reader option(s) {changed} only apply to an ad-hoc input=; set "
                    "them per source (sources.<name>.<option>) or pass input=<file or glob>"
                )
            if not any(s.enabled for s in self.sources.values()):
                p.add(
                    "nothing to do: give input=<file or glob> (with reader=...), or sources, "
                    "e.g. 'sources=[huatuo26m_test]'"
                )
            for n, s in self.sources.items():
                s.collect_problems(n, p)
        p.raise_if_any()


def available_sources(sources_dir: str | Path) -> list[str]:
    """The corpus names of the YAML files under ``sources_dir`` (``conf/sources``)."""
    return sorted(p.stem for p in Path(sources_dir).glob("*.yaml"))


_SOURCES_OVERRIDE = re.compile(r"^(?:\+\+|\+|~)?sources=(.*)$", re.S)


def check_source_overrides(overrides: list[str], sources_dir: str | Path) -> None:
    """Raise ``ConfigError`` for corpus names in ``sources=[...]`` overrides that have no YAML
    under ``sources_dir``, listing every unknown name and the available corpora."""
    unknown: list[str] = []
    for ov in overrides:
        m = _SOURCES_OVERRIDE.match(ov.strip())
        if not m:
            continue
        value = m.group(1).strip()
        if value.startswith("[") and value.endswith("]"):
            value = value[1:-1]
        for name in value.split(","):
            name = name.strip().strip("'\"").strip()
            if name and name != "null" and name not in unknown:
                unknown.append(name)
    have = available_sources(sources_dir)
    unknown = [n for n in unknown if n not in have]
    if unknown:
        raise ConfigError(
            f"unknown corpus name(s) {unknown} in sources=; available corpora (conf/sources/): "
            f"{', '.join(have)}. Add a YAML under conf/sources/ for a new corpus, or run one file "
            "with input=<file or glob>"
        )


def register() -> None:
    """Register the schema as ``preprocess_schema`` in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="preprocess_schema", node=PreprocessConfig)
