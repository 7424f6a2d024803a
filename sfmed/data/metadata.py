"""Identity of a tokenizer and the metadata sidecar written next to every indexed dataset.

Each output ``<prefix>.bin/.idx`` gets ``<prefix>.json`` (written last, so its presence means the
pair is complete) recording which tokenizer produced the ids, the source and its config hash, and
the counts. Blends compare these sidecars so that outputs of different tokenizers are never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sfmed.core.atomic import atomic_write_text
from sfmed.core.errors import UserError

FORMAT = "sfmed-indexed-dataset/1"
# Keys of tokenizer.json that decide the ids of ``encode(text, add_special_tokens=False)``;
# decoder, post-processor (adds BOS/EOS only with special tokens), padding and truncation do not.
_ID_DEFINING_KEYS = ("normalizer", "pre_tokenizer", "model", "added_tokens")
_ADDED_TOKEN_KEYS = ("id", "content", "single_word", "lstrip", "rstrip", "normalized", "special")


class DatasetMetadataError(UserError, ValueError):
    """An indexed dataset's sidecar is missing, unreadable or inconsistent with its files."""


def sidecar_path(prefix: str | os.PathLike) -> Path:
    """``<prefix>.json``: the metadata sidecar of an indexed dataset prefix."""
    return Path(f"{os.fspath(prefix)}.json")


def _sorted_json_bytes(data: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, compact); orjson when installed, else ``json``.

    Both give the same bytes for tokenizer data (str/int/float/bool/None, no NaN), so the hash
    does not depend on whether orjson is present (training's pre-flight runs without it).
    """
    try:
        import orjson
    except ImportError:
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


def _canonical_tokenizer_json(path: Path) -> bytes:
    data = json.loads(path.read_bytes())
    canon: dict[str, Any] = {k: data.get(k) for k in _ID_DEFINING_KEYS}
    model = dict(canon.get("model") or {})
    merges = model.get("merges")
    if isinstance(merges, list):
        # tokenizers < 0.20 writes "a b", newer versions write ["a", "b"]: same merges.
        model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    canon["model"] = model
    canon["added_tokens"] = sorted(
        ({k: t.get(k) for k in _ADDED_TOKEN_KEYS} for t in canon.get("added_tokens") or []),
        key=lambda t: (t["id"] is None, t["id"]),
    )
    return _sorted_json_bytes(canon)


def _file_digest_input(f: Path) -> bytes:
    if f.suffix != ".json":
        return f.read_bytes()
    if f.name == "vocab.json":
        return _sorted_json_bytes(json.loads(f.read_bytes()))
    return _canonical_tokenizer_json(f)


def tokenizer_files(path: str | os.PathLike) -> tuple[str, list[Path]]:
    """The kind (``hf`` or ``sentencepiece``) and the files that define a tokenizer's ids.

    ``path`` is an HF tokenizer folder (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``),
    a ``tokenizer.json`` file, a SentencePiece ``.model`` file, or a folder holding only a
    ``tokenizer.model``.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix == ".model":
            return "sentencepiece", [p]
        if p.suffix == ".json":
            return "hf", [p]
    elif p.is_dir():
        if (p / "tokenizer.json").is_file():
            return "hf", [p / "tokenizer.json"]
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return "hf", [p / "vocab.json", p / "merges.txt"]
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return "sentencepiece", models
    raise FileNotFoundError(
        f"tokenizer {p} is not a tokenizer: expected an HF tokenizer folder (with tokenizer.json), "
        "a tokenizer.json file, or a SentencePiece .model file. Set tokenizer=<dir or .model>."
    )


_HASH_VERSION = "v1"


def _hash_cache_file() -> Path:
    base = os.environ.get("SFMED_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sfmed"
    )
    return Path(base) / "tokenizer_hashes.json"


def cached_tokenizer_hash(file_digest: str) -> str | None:
    """The :func:`tokenizer_hash` recorded for tokenizer files with this raw ``file_digest``."""
    try:
        return json.loads(_hash_cache_file().read_text()).get(f"{_HASH_VERSION}:{file_digest}")
    except (OSError, ValueError, AttributeError):
        return None


def _remember_hash(file_digest: str, value: str) -> None:
    f = _hash_cache_file()
    try:
        try:
            cache = json.loads(f.read_text())
            cache = cache if isinstance(cache, dict) else {}
        except (OSError, ValueError):
            cache = {}
        cache[f"{_HASH_VERSION}:{file_digest}"] = value
        atomic_write_text(f, json.dumps(cache, indent=0, sort_keys=True))
    except OSError:  # a read-only home is fine: the hash is just computed again next time
        pass


def tokenizer_hash(path: str | os.PathLike) -> str:
    """A short stable hash of the tokenizer at ``path`` (folder, tokenizer.json or .model).

    For ``tokenizer.json`` only the parts that decide the ids are hashed, in canonical form, so a
    re-saved copy of the same tokenizer (e.g. next to a checkpoint) hashes the same. Parsing
    Qwen2's 7 MB tokenizer.json takes ~0.1 s, so results are cached by the raw files' digest
    under ``$SFMED_CACHE_DIR`` (default ``~/.cache/sfmed``).
    """
    digest = tokenizer_file_digest(path)
    cached = cached_tokenizer_hash(digest)
    if cached:
        return cached
    kind, files = tokenizer_files(path)
    h = hashlib.sha256(kind.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(_file_digest_input(f))
    value = h.hexdigest()[:16]
    _remember_hash(digest, value)
    return value


def tokenizer_file_digest(path: str | os.PathLike) -> str:
    """A hash of the raw bytes of the tokenizer's files: cheap (no parsing), but unlike
    :func:`tokenizer_hash` it changes when the same tokenizer is re-saved."""
    kind, files = tokenizer_files(path)
    h = hashlib.sha256(kind.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def config_hash(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable config object."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_sidecar(prefix: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``<prefix>.json`` atomically; call only after ``.bin``/``.idx`` are in place."""
    out = sidecar_path(prefix)
    atomic_write_text(out, json.dumps({"format": FORMAT, **meta}, indent=2, ensure_ascii=False))
    return out


def read_sidecar(prefix: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar of ``prefix`` as a dict, or None when it is absent."""
    p = sidecar_path(prefix)
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetMetadataError(f"{p} is not readable JSON ({e}); re-run preprocessing") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DatasetMetadataError(
            f"{p} is not an sfmed dataset sidecar (format {meta.get('format')!r} != {FORMAT!r}); "
            "re-run launch/preprocess.py for this source"
        )
    return meta


def check_files_match(prefix: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Raise unless ``<prefix>.bin/.idx`` exist and have the sizes recorded in ``meta``."""
    prefix = os.fspath(prefix)
    for ext, key in ((".bin", "bin_bytes"), (".idx", "idx_bytes")):
        f = Path(prefix + ext)
        if not f.is_file():
            raise DatasetMetadataError(f"{f} is missing (sidecar {prefix}.json names it)")
        if key in meta and f.stat().st_size != meta[key]:
            raise DatasetMetadataError(
                f"{f} has {f.stat().st_size} bytes but {prefix}.json records {meta[key]}: the "
                "files were changed or only partly written; re-run launch/preprocess.py"
            )
