"""Finding input files, detecting compression, cutting large files into chunks, decoding bytes.

A chunk is a byte range of an uncompressed line-based file (cut at line or paragraph boundaries)
or a whole file; compressed line-based files are streamed and cut into in-memory chunks.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sfmed.core.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_COMPRESSED_SUFFIXES = (".gz", ".gzip", ".zst", ".zstd")
_FORMAT_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Encodings in which byte 0x0A is always a newline (no multi-byte sequence contains it), so
# files can be cut at b"\n" before decoding.
_NEWLINE_SAFE = {
    "utf-8",
    "utf_8",
    "gb18030",
    "gbk",
    "gb2312",
    "big5",
    "ascii",
    "latin-1",
    "iso8859-1",
    "cp1252",
    "cp936",
    "euc_jp",
    "shift_jis",
    "big5hkscs",
}


class InputError(UserError, ValueError):
    """An input file or pattern the user gave cannot be used."""


def expand_files(patterns: list[str] | str, base: str | os.PathLike | None = None) -> list[Path]:
    """Resolve paths/globs (``**`` recursive) to a sorted, de-duplicated file list.

    Relative patterns are taken from ``base``. A plain path that does not exist or a glob that
    matches nothing is an error naming the pattern.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[Path] = []
    seen: set[Path] = set()
    for pat in patterns:
        pat = os.path.expanduser(os.fspath(pat))
        full = pat if os.path.isabs(pat) or base is None else os.path.join(os.fspath(base), pat)
        if glob.has_magic(full):
            matches = sorted(Path(m) for m in glob.glob(full, recursive=True) if os.path.isfile(m))
            if not matches:
                raise InputError(f"{full!r} matches no files; check the path or data_root")
        else:
            p = Path(full)
            if p.is_dir():
                raise InputError(f"{full} is a folder; give files or a glob like {full}/*.jsonl")
            if not p.is_file():
                raise InputError(f"input file {full} does not exist; check the path or data_root")
            matches = [p]
        for m in matches:
            r = m.resolve()
            if r not in seen:
                seen.add(r)
                out.append(m)
    return out


def compression_of(path: str | os.PathLike) -> str | None:
    """``gzip``, ``zstd`` or None, from the file's magic bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


def strip_compression_suffix(name: str) -> str:
    """``a.jsonl.gz`` -> ``a.jsonl``."""
    for s in _COMPRESSED_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def detect_format(path: str | os.PathLike) -> str:
    """Reader name from the extension (after a compression suffix)."""
    name = strip_compression_suffix(Path(path).name)
    fmt = _FORMAT_BY_SUFFIX.get(Path(name).suffix.lower())
    if fmt is None:
        raise InputError(
            f"cannot tell the format of {path} from its extension; set reader= to one of text, "
            "jsonl, json, csv, tsv, parquet"
        )
    return fmt


def source_stem(pattern: str) -> str:
    """Default source name of an ad-hoc input: the file stem, wildcards removed."""
    name = strip_compression_suffix(Path(pattern).name)
    stem = Path(name).stem if "." in name else name
    stem = "".join(c for c in stem if c not in "*?[]").strip("._-")
    return stem or Path(pattern).parent.name or "input"


def open_binary(path: str | os.PathLike, compression: str | None) -> io.BufferedIOBase:
    """Open ``path`` for reading bytes, decompressing gzip/zstd streams."""
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def read_all(path: str | os.PathLike) -> bytes:
    """The whole (decompressed) contents of ``path``."""
    with open_binary(path, compression_of(path)) as f:
        return f.read()


def newline_safe(encoding: str) -> bool:
    """Whether files in ``encoding`` may be cut at ``\\n`` bytes."""
    return codecs.lookup(encoding).name in {codecs.lookup(e).name for e in _NEWLINE_SAFE}


@dataclass
class Chunk:
    """A unit of parallel work: a byte range of a file, in-memory bytes, or a whole file."""

    file: str
    start: int = 0
    end: int | None = None  # None: to the end of the file
    data: bytes | None = None
    index: int = 0  # position among the file's chunks
    whole_file: bool = False


def _boundary(f, pos: int, sep: bytes, size: int) -> int:
    """First offset >= pos just after ``sep`` (or the file size)."""
    f.seek(pos)
    buf, base, keep = b"", pos, len(sep) - 1
    while True:
        block = f.read(1 << 16)
        if not block:
            return size
        buf += block
        i = buf.find(sep)
        if i >= 0:
            return base + i + len(sep)
        base += len(buf) - keep
        buf = buf[len(buf) - keep :]


def plan_chunks(path: str | os.PathLike, chunk_bytes: int, sep: bytes | None) -> list[Chunk]:
    """Cut an uncompressed file into ranges of about ``chunk_bytes`` ending after ``sep``.

    ``sep=None`` keeps the file whole.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if sep is None or size <= chunk_bytes:
        return [Chunk(path, 0, None, whole_file=True)]
    out: list[Chunk] = []
    start = 0
    with open(path, "rb") as f:
        while start < size:
            end = (
                size
                if start + chunk_bytes >= size
                else _boundary(f, start + chunk_bytes, sep, size)
            )
            out.append(Chunk(path, start, end, index=len(out)))
            start = end
    return out


def stream_chunks(path: str | os.PathLike, compression: str, chunk_bytes: int, sep: bytes):
    """Yield in-memory chunks of a compressed file, each ending after ``sep`` (or at EOF)."""
    path = os.fspath(path)
    pending = b""
    index = 0
    with open_binary(path, compression) as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            pending += block
            cut = pending.rfind(sep)
            if cut < 0:
                continue
            cut += len(sep)
            yield Chunk(path, data=pending[:cut], index=index)
            index += 1
            pending = pending[cut:]
    if pending or index == 0:
        yield Chunk(path, data=pending, index=index)


def read_chunk(chunk: Chunk) -> bytes:
    """The bytes of a chunk (decompressing a whole compressed file when needed)."""
    if chunk.data is not None:
        return chunk.data
    if chunk.whole_file:
        return read_all(chunk.file)
    with open(chunk.file, "rb") as f:
        f.seek(chunk.start)
        return f.read(
            (chunk.end if chunk.end is not None else os.path.getsize(chunk.file)) - chunk.start
        )


_tls = threading.local()


def _count_invalid(exc: UnicodeDecodeError):
    _tls.invalid = getattr(_tls, "invalid", 0) + exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("sfmed-count", _count_invalid)


def decode(data: bytes, encoding: str) -> tuple[str, int]:
    """``(text, number of invalid bytes)``; invalid bytes become U+FFFD."""
    try:
        return data.decode(encoding), 0
    except UnicodeDecodeError:
        _tls.invalid = 0
        text = data.decode(encoding, errors="sfmed-count")
        return text, _tls.invalid


def iter_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """``(1-based line number within data, line without its line end)``."""
    for i, line in enumerate(data.split(b"\n"), 1):
        yield i, line[:-1] if line.endswith(b"\r") else line
