"""Readers: the bytes of a chunk -> records, with their location and invalid-byte count.

Each reader yields ``(loc, record, invalid_bytes)``: ``loc`` is a 1-based line number within the
chunk (line-based formats) or a ``"#<item>"``/``"row <n>"`` string; ``record`` is a dict, a
string (text reader) or a :class:`Malformed` describing why the record could not be parsed.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from typing import Any

import orjson

from sfmed.data.io import decode

LINE_FORMATS = ("jsonl", "csv", "tsv")
# Long fields (whole articles in one cell) are records, not errors.
csv.field_size_limit(2**31 - 1)


class Malformed:
    """A record that could not be parsed or rendered (counted as ``malformed``)."""

    __slots__ = ("msg",)

    def __init__(self, msg: str):
        self.msg = msg


class MalformedRecord(ValueError):
    """Raised by renderers for a record that lacks what the source's shape needs."""


Item = tuple[Any, Any, int]

_UTF8 = ("utf-8", "utf8", "utf_8")
_BLANK = re.compile(r"^[ \t\r\u3000]*$")


def _decoded_lines(data: bytes, encoding: str) -> Iterator[tuple[int, str, int]]:
    """``(line number, line, invalid bytes)`` for every line of ``data`` (line end removed)."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        for i, raw in enumerate(data.split(b"\n"), 1):
            line, bad = decode(raw, encoding)
            yield i, line[:-1] if line.endswith("\r") else line, bad
        return
    for i, line in enumerate(text.split("\n"), 1):
        yield i, line[:-1] if line.endswith("\r") else line, 0


def read_text(data: bytes, encoding: str, mode: str) -> Iterator[Item]:
    """Plain text: the whole chunk (``file``), each ``line``, or each blank-line ``paragraph``."""
    if mode == "file":
        text, bad = decode(data, encoding)
        if text.startswith("\ufeff"):
            text = text[1:]
        yield 1, text, bad
        return
    if mode == "line":
        for i, line, bad in _decoded_lines(data, encoding):
            if line:
                yield i, line, bad
        return
    para: list[str] = []
    start, bad_sum = 0, 0
    for i, line, bad in _decoded_lines(data, encoding):
        if _BLANK.match(line):
            if para:
                yield start, "\n".join(para), bad_sum
                para, bad_sum = [], 0
            continue
        if not para:
            start = i
        para.append(line)
        bad_sum += bad
    if para:
        yield start, "\n".join(para), bad_sum


def read_jsonl(data: bytes, encoding: str) -> Iterator[Item]:
    """JSON lines; blank lines are skipped, a line that is not JSON is ``Malformed``."""
    loads = orjson.loads
    if encoding.lower() in _UTF8:
        for i, line in enumerate(data.split(b"\n"), 1):
            try:
                yield i, loads(line), 0
            except orjson.JSONDecodeError as e:
                if not line.strip():
                    continue
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    text, bad = decode(line, "utf-8")
                    try:
                        yield i, loads(text), bad
                    except orjson.JSONDecodeError as e2:
                        yield i, Malformed(f"invalid JSON: {e2}"), bad
                    continue
                yield i, Malformed(f"invalid JSON: {e}"), 0
        return
    for i, line, bad in _decoded_lines(data, encoding):
        if not line.strip():
            continue
        try:
            yield i, loads(line), bad
        except orjson.JSONDecodeError as e:
            yield i, Malformed(f"invalid JSON: {e}"), bad


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(obj, dict):
            obj = obj[part]
        elif isinstance(obj, list) and part.lstrip("-").isdigit():
            obj = obj[int(part)]
        else:
            raise KeyError(path)
    return obj


def read_json(data: bytes, encoding: str, json_key: str | None) -> Iterator[Item]:
    """A JSON array, an object holding the records under ``json_key``, or JSON lines."""
    text, bad = decode(data, encoding)
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        return
    if stripped[0] == "{" and json_key is None:
        first, _, rest = stripped.partition("\n")
        try:
            orjson.loads(first)
            is_lines = bool(rest.strip())
        except orjson.JSONDecodeError:
            is_lines = False
        if is_lines:
            # Named .json but written as JSON lines (common for these corpora).
            yield from read_jsonl(text.encode("utf-8"), "utf-8")
            return
    try:
        doc = orjson.loads(stripped)
    except orjson.JSONDecodeError as e:
        if stripped[0] == "{" and json_key is None and "\n" in stripped:
            # JSON lines whose first line is broken: count the bad lines, keep the rest.
            yield from read_jsonl(text.encode("utf-8"), "utf-8")
            return
        yield 1, Malformed(f"invalid JSON document: {e}"), bad
        return
    if json_key:
        try:
            doc = _get_path(doc, json_key)
        except (KeyError, IndexError, TypeError):
            yield 1, Malformed(f"json_key {json_key!r} not found in the document"), bad
            return
    if isinstance(doc, dict):
        yield "#1", doc, bad
        return
    if not isinstance(doc, list):
        yield 1, Malformed(f"top-level JSON value is a {type(doc).__name__}, not records"), bad
        return
    # Invalid bytes are attributed to the file as a whole, reported on the first record.
    for n, rec in enumerate(doc, 1):
        yield f"#{n}", rec, bad if n == 1 else 0


def read_csv(
    data: bytes, encoding: str, delimiter: str, columns: list[str] | None
) -> Iterator[Item]:
    """CSV/TSV rows as dicts keyed by the header row, or by ``columns`` for files without one;
    a row with the wrong number of fields is ``Malformed``. Quoted fields may span lines."""
    lines = list(_decoded_lines(data, encoding))
    bad_by_line = {i: b for i, _, b in lines if b}
    if lines and lines[0][1].startswith("\ufeff"):
        lines[0] = (lines[0][0], lines[0][1][1:], lines[0][2])
    if lines and lines[-1][1] == "":
        lines.pop()
    reader = csv.reader(io.StringIO("\n".join(x[1] for x in lines)), delimiter=delimiter)
    header = list(columns) if columns else None
    prev = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a stray quote; the reader goes on with the next line
            yield prev + 1, Malformed(f"CSV error: {e}"), 0
            prev = reader.line_num
            continue
        first, last = prev + 1, reader.line_num
        prev = last
        bad = sum(bad_by_line.get(i, 0) for i in range(first, last + 1)) if bad_by_line else 0
        if header is None:
            header = [h.strip() for h in row]
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            yield first, Malformed(f"{len(row)} fields, expected {len(header)}"), bad
            continue
        yield first, dict(zip(header, row)), bad


def read_parquet(path: str, row_group: int, columns: list[str] | None) -> Iterator[Item]:
    """The rows of one Parquet row group as dicts (``columns`` limits what is read)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    start = sum(pf.metadata.row_group(i).num_rows for i in range(row_group))
    names = set(pf.schema_arrow.names)
    cols = [c for c in columns if c in names] if columns else None
    table = pf.read_row_group(row_group, columns=cols or None)
    for n, rec in enumerate(table.to_pylist(), start + 1):
        for k, v in rec.items():
            if isinstance(v, bytes):
                rec[k], bad = decode(v, "utf-8")
                if bad:
                    yield f"row {n}", rec, bad
                    break
        else:
            yield f"row {n}", rec, 0
