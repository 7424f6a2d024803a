"""Reading the raw files behind the loaders: CSV/TSV, JSON arrays and JSONL, file or folder."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path

from sfmed.eval.items import DataError

JSON_SUFFIXES = (".json", ".jsonl")


def data_files(path: str | Path, suffixes: Iterable[str]) -> list[Path]:
    """``path`` itself, or the files with one of ``suffixes`` directly inside the folder, sorted."""
    p = Path(path)
    suffixes = tuple(suffixes)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"data folder {p} holds no {'/'.join(suffixes)} files")
        return files
    raise DataError(f"data path {p} does not exist; pass data=<file or folder>")


def read_text(path: Path) -> str:
    """UTF-8 text (a BOM is dropped); a clear error for other encodings."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 (byte {e.start}); convert it first, e.g. "
            f"`iconv -f GB18030 -t UTF-8 {path.name}`"
        ) from None


def read_csv(
    path: Path, required: Iterable[str] = (), delimiter: str = ","
) -> list[dict[str, str]]:
    """Rows of a headed CSV as dicts; fails naming the file when a required column is missing."""
    # StringIO(newline="") keeps newlines inside quoted cells (CMExam's one-option-per-line).
    rows = list(csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter))
    if not rows:
        raise DataError(f"{path} has no data rows")
    header = set(rows[0].keys())
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {missing}; found {sorted(header)} — is format= right?"
        )
    return rows


def read_records(path: Path) -> list[dict]:
    """Objects of a JSON array (or ``{"data": [...]}``) or of a JSONL file, in file order."""
    text = read_text(path)
    if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith(("[", "{")):
        return _read_jsonl(path, text)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{"):  # JSONL that happens to have a .json suffix
            return _read_jsonl(path, text)
        raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of objects (or one list inside)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of objects")
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise DataError(f"{path} item {i}: expected an object, got {type(r).__name__}")
    return obj


def _read_jsonl(path: Path, text: str) -> list[dict]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise DataError(f"{path} line {lineno}: expected an object")
        out.append(r)
    return out


def own_id(record: dict, pos: int, key: str = "id") -> str:
    """The record's own id when it has a non-empty one, else its 0-based position (as text)."""
    v = record.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        return str(pos)
    return str(v).strip()


def prefixed(file: Path, files: list[Path], item_id: str) -> str:
    """Ids stay as they are for a single file; with a folder they get the file stem in front."""
    return item_id if len(files) == 1 else f"{file.stem}/{item_id}"
