"""The token report: ``report.json`` and ``report.md`` (the table users put in their README)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sfmed.core.atomic import atomic_write_text
from sfmed.data.worker import DROP_REASONS

_COUNT_KEYS = ("files", "records_read", "records_kept", "documents", "tokens", "invalid_bytes")


def empty_stats() -> dict[str, Any]:
    """Zeroed per-source statistics."""
    return {
        **dict.fromkeys(_COUNT_KEYS, 0),
        "dropped": dict.fromkeys(DROP_REASONS, 0),
    }


def _add(total: dict, s: dict) -> None:
    for k in _COUNT_KEYS:
        total[k] += s.get(k, 0)
    for k, v in s.get("dropped", {}).items():
        total["dropped"][k] = total["dropped"].get(k, 0) + v


def build_report(sources: dict[str, dict], settings: dict[str, Any]) -> dict[str, Any]:
    """Per source (as given), per group and overall totals."""
    groups: dict[str, dict] = {}
    total = empty_stats()
    for s in sources.values():
        g = groups.setdefault(s.get("group", "other"), {**empty_stats(), "sources": []})
        g["sources"].append(s["name"])
        _add(g, s)
        _add(total, s)
    return {"settings": settings, "sources": sources, "groups": groups, "total": total}


def _fmt_tokens(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


_LABELS = {
    "empty": "empty",
    "too_short": "too short",
    "too_long": "too long",
    "malformed": "malformed",
    "decode_error": "decode errors",
    "duplicate": "duplicate",
    "near_duplicate": "near-dup",
}


def _row(name: str, group: str, s: dict, reasons: list[str], bold: bool = False) -> str:
    cells = [name, group, f"{s['files']:,}", f"{s['records_read']:,}", f"{s['records_kept']:,}"]
    cells += [f"{s['dropped'].get(r, 0):,}" for r in reasons]
    cells += [f"{s['documents']:,}", f"{s['tokens']:,}", _fmt_tokens(s["tokens"])]
    if bold:
        cells = [f"**{c}**" if c else c for c in cells]
    return "| " + " | ".join(cells) + " |"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one table (sources, group totals, total) + notes."""
    reasons = list(DROP_REASONS)
    st = report["settings"]
    lines = [
        "# Pretraining data report",
        "",
        f"Tokenizer: `{st.get('tokenizer', {}).get('path')}` (hash "
        f"`{st.get('tokenizer', {}).get('hash')}`, backend {st.get('tokenizer', {}).get('backend')}, "
        f"EOD `{st.get('tokenizer', {}).get('eod_token')}` = {st.get('tokenizer', {}).get('eod_id')}); "
        f"clean={str(st.get('clean')).lower()}, dedup={st.get('dedup')}, "
        f"strict={str(st.get('strict')).lower()}.",
        "",
        "Tokens include one EOD per document. Every record read is either kept (documents) or "
        "dropped for exactly one reason.",
        "",
        "| 数据集名称 (source) | group | files | records read | kept | "
        + " | ".join(_LABELS[r] for r in reasons)
        + " | 数据集条数 (documents) | 数据集Token数 (tokens) | tokens |",
        "|" + "---|" * 2 + "---:|" * (3 + len(reasons) + 3),
    ]
    for name, s in report["sources"].items():
        label = name + (" (reused)" if s.get("reused") else "")
        lines.append(_row(label, s.get("group", ""), s, reasons))
    for g, s in report["groups"].items():
        lines.append(_row(f"{g} total", g, s, reasons, bold=True))
    lines.append(_row("total", "", report["total"], reasons, bold=True))
    samples = [(n, s) for n, s in report["sources"].items() if s.get("malformed_samples")]
    if samples:
        lines += ["", "## Malformed or undecodable records (samples)", ""]
        for n, s in samples:
            for smp in s["malformed_samples"]:
                lines.append(f"- {n}: `{smp}`")
    bad = [(n, s["invalid_bytes"]) for n, s in report["sources"].items() if s.get("invalid_bytes")]
    if bad:
        lines += ["", "Invalid bytes for the declared encoding: "]
        lines[-1] += ", ".join(f"{n} {b:,}" for n, b in bad) + "."
    lines += ["", f"Outputs: `{st.get('output_dir')}/<source>_text_document.bin/.idx/.json`.", ""]
    return "\n".join(lines)


def write_report(output_dir: str | Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` atomically."""
    out = Path(output_dir)
    j, m = out / "report.json", out / "report.md"
    atomic_write_text(j, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(m, render_markdown(report))
    return j, m
