"""Blends of indexed datasets: weights or target token counts -> megatron-core's ``blend``.

``resolve_blend`` turns a list of entries such as::

    [{"prefix": "data/cmtmedqa_text_document", "tokens": 300_000_000, "group": "medical"},
     {"prefix": "data/wiki2019zh_text_document", "tokens": 700_000_000, "group": "general"}]

into ``(prefixes, weights)`` for ``GPTDatasetConfig(blend=(prefixes, weights))``, after checking
that every output exists, is complete and was tokenized by the same tokenizer.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfmed.core.errors import UserError
from sfmed.data.indexed import bin_path, idx_path, read_index_header
from sfmed.data.metadata import (
    DatasetMetadataError,
    check_files_match,
    read_sidecar,
    tokenizer_hash,
)

__all__ = ["BlendError", "BlendEntry", "describe_blend", "resolve_blend", "tokenizer_hash"]

logger = logging.getLogger(__name__)

_ENTRY_KEYS = {"prefix", "weight", "tokens", "group"}


class BlendError(UserError, ValueError):
    """A blend that cannot be used: missing output, bad weight, tokenizer mismatch, ..."""


@dataclass
class BlendEntry:
    """One resolved blend entry (what ``describe_blend`` returns)."""

    prefix: str
    group: str | None
    available_tokens: int
    documents: int
    weight: float  # normalised sampling weight
    target_tokens: int | None  # when the blend was given in tokens
    tokenizer_hash: str | None

    @property
    def epochs(self) -> float | None:
        """How many times the output is seen for its target (the upsampling factor)."""
        if self.target_tokens is None or not self.available_tokens:
            return None
        return self.target_tokens / self.available_tokens


def _number(entry_i: int, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise BlendError(
                f"blend entry {entry_i}: {key}={value!r} is not a number; give a positive number"
            ) from None
    if not math.isfinite(value) or value <= 0:
        raise BlendError(
            f"blend entry {entry_i}: {key}={value!r} must be a positive number (a dataset you do "
            "not want to sample is removed from the blend, not given weight 0)"
        )
    return float(value)


def _looks_like_hash(s: str) -> bool:
    return len(s) == 16 and all(c in "0123456789abcdef" for c in s)


def _expected_hash(tokenizer: str | os.PathLike | None) -> str | None:
    if tokenizer is None:
        return None
    t = os.fspath(tokenizer)
    if Path(t).exists():
        return tokenizer_hash(t)
    if _looks_like_hash(t):
        return t
    raise BlendError(
        f"tokenizer={t!r} is neither an existing tokenizer path nor a tokenizer hash; point it to "
        "the tokenizer folder or .model the model uses"
    )


def _inspect(i: int, prefix: str, require_metadata: bool) -> tuple[dict, dict | None]:
    if prefix.endswith((".bin", ".idx")):
        raise BlendError(
            f"blend entry {i}: prefix {prefix!r} ends in {prefix[-4:]}; give the prefix without "
            f"the extension ({prefix[:-4]!r})"
        )
    missing = [str(p) for p in (bin_path(prefix), idx_path(prefix)) if not p.is_file()]
    if missing:
        raise BlendError(
            f"blend entry {i}: {' and '.join(missing)} not found; fix the prefix or create the "
            "dataset with `python launch/preprocess.py ...`"
        )
    try:
        meta = read_sidecar(prefix)
    except DatasetMetadataError as e:
        raise BlendError(f"blend entry {i}: {e}") from e
    if meta is None:
        if require_metadata:
            raise BlendError(
                f"blend entry {i}: {prefix}.json (the metadata sidecar with the tokenizer hash) "
                "is missing, so the tokenizer of this output cannot be checked. Re-create it with "
                "launch/preprocess.py, or pass require_metadata=False to accept unverified outputs."
            )
    else:
        try:
            check_files_match(prefix, meta)
        except DatasetMetadataError as e:
            raise BlendError(f"blend entry {i}: {e}") from e
    try:
        header = read_index_header(prefix)
    except (OSError, ValueError, KeyError) as e:
        raise BlendError(f"blend entry {i}: cannot read {idx_path(prefix)}: {e}") from e
    if header["documents"] <= 0 or header["tokens"] <= 0:
        raise BlendError(f"blend entry {i}: {prefix} holds no documents; remove it from the blend")
    return header, meta


def describe_blend(
    entries: list[dict],
    *,
    tokenizer: str | os.PathLike | None = None,
    groups: dict[str, dict] | None = None,
    require_metadata: bool = True,
) -> list[BlendEntry]:
    """Validate a blend and return one ``BlendEntry`` per dataset (weights normalised).

    ``groups`` optionally gives a target per group, e.g. ``{"medical": {"tokens": 1.3e9},
    "general": {"tokens": 1.4e9}}``; entries of such a group that carry neither ``weight`` nor
    ``tokens`` share the group's target in proportion to their sizes.
    """
    if not isinstance(entries, (list, tuple)) or not entries:
        raise BlendError("the blend is empty: give a list of {prefix, weight|tokens[, group]}")
    groups = {str(k): dict(v) for k, v in (groups or {}).items()}
    expected = _expected_hash(tokenizer)

    rows: list[dict] = []
    seen: dict[str, int] = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) and hasattr(e, "items"):
            e = dict(e.items())
        if not isinstance(e, dict) or "prefix" not in e:
            raise BlendError(f"blend entry {i} ({e!r}) must be a mapping with a 'prefix'")
        unknown = set(e) - _ENTRY_KEYS
        if unknown:
            raise BlendError(
                f"blend entry {i}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}"
            )
        prefix = os.path.abspath(os.fspath(e["prefix"]))
        if prefix in seen:
            raise BlendError(
                f"blend entries {seen[prefix]} and {i} both name {prefix}; list each output once "
                "and raise its weight instead"
            )
        seen[prefix] = i
        if "weight" in e and "tokens" in e:
            raise BlendError(f"blend entry {i} ({prefix}) has both weight and tokens; give one")
        group = None if e.get("group") is None else str(e["group"])
        kind, value = None, None
        for k in ("weight", "tokens"):
            if k in e and e[k] is not None:
                kind, value = k, _number(i, k, e[k])
        if kind is None:
            target = groups.get(group or "")
            if not target:
                raise BlendError(
                    f"blend entry {i} ({prefix}) has neither weight nor tokens"
                    + (f" and group {group!r} has no target in groups" if group else "")
                    + "; add weight: <number> or tokens: <count>"
                )
        header, meta = _inspect(i, prefix, require_metadata)
        rows.append(
            {
                "i": i,
                "prefix": prefix,
                "group": group,
                "kind": kind,
                "value": value,
                "header": header,
                "meta": meta,
            }
        )

    # Group targets: split among members without their own weight/tokens, by size.
    for name, target in groups.items():
        members = [r for r in rows if r["group"] == name and r["kind"] is None]
        if not members:
            continue
        if set(target) - {"weight", "tokens"} or len(target) != 1:
            raise BlendError(f"groups.{name} must be {{weight: x}} or {{tokens: n}}, got {target}")
        ((gkind, gval),) = target.items()
        gval = _number(-1, f"groups.{name}.{gkind}", gval)
        total = sum(r["header"]["tokens"] for r in members)
        for r in members:
            r["kind"], r["value"] = gkind, gval * r["header"]["tokens"] / total

    kinds = {r["kind"] for r in rows}
    if len(kinds) > 1:
        by = {k: [r["i"] for r in rows if r["kind"] == k] for k in kinds}
        raise BlendError(
            f"the blend mixes weights (entries {by.get('weight')}) and token targets (entries "
            f"{by.get('tokens')}); use one kind for all entries"
        )

    hashes = {r["prefix"]: (r["meta"] or {}).get("tokenizer", {}).get("hash") for r in rows}
    known = {h for h in hashes.values() if h}
    if len(known) > 1:
        listing = "\n".join(f"  {p}: {h}" for p, h in hashes.items())
        raise BlendError(
            "the blend mixes outputs of different tokenizers (tokenizer hash per output):\n"
            f"{listing}\nre-tokenize them with the same tokenizer"
        )
    eods = {(r["meta"] or {}).get("tokenizer", {}).get("eod_id") for r in rows if r["meta"]}
    if len(eods) > 1:
        raise BlendError(f"the blend mixes outputs with different EOD ids {sorted(eods)}")
    if expected is not None and known and known != {expected}:
        raise BlendError(
            f"the blend's outputs were tokenized with tokenizer {known.pop()} but tokenizer="
            f"{os.fspath(tokenizer)} hashes to {expected}; use the tokenizer the data was "
            "made with, or re-run launch/preprocess.py with this one"
        )

    total = sum(r["value"] for r in rows)
    out = []
    for r in rows:
        out.append(
            BlendEntry(
                prefix=r["prefix"],
                group=r["group"],
                available_tokens=r["header"]["tokens"],
                documents=r["header"]["documents"],
                weight=r["value"] / total,
                target_tokens=round(r["value"]) if r["kind"] == "tokens" else None,
                tokenizer_hash=hashes[r["prefix"]],
            )
        )
    return out


def resolve_blend(
    entries: list[dict],
    *,
    tokenizer: str | os.PathLike | None = None,
    groups: dict[str, dict] | None = None,
    require_metadata: bool = True,
) -> tuple[list[str], list[float]]:
    """``(prefixes, normalised weights)`` for ``GPTDatasetConfig(blend=...)``.

    Each entry is ``{"prefix": str, "weight": float}`` or ``{"prefix": str, "tokens": int}``
    (a target token count: the weight becomes that target, i.e. ``tokens / size`` epochs of the
    output), optionally with ``"group"``. Raises ``BlendError`` with the offending entry and the
    fix for: missing ``.bin``/``.idx``, missing or stale sidecar, zero/negative weight, weights
    mixed with token targets, outputs of different tokenizers, and a mismatch with ``tokenizer``
    (a tokenizer folder/.model or its ``tokenizer_hash``) when given.
    """
    resolved = describe_blend(
        entries, tokenizer=tokenizer, groups=groups, require_metadata=require_metadata
    )
    for r in resolved:
        epochs = f", {r.epochs:.2f} epochs" if r.epochs is not None else ""
        logger.info(
            "blend: %s weight %.4f (%d tokens available%s)",
            r.prefix,
            r.weight,
            r.available_tokens,
            epochs,
        )
    return [r.prefix for r in resolved], [r.weight for r in resolved]
