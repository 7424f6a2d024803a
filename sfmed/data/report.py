"""The token report: ``report.json`` and ``report.md`` (the table users put in their README).

One report per output folder, merged over runs: a run replaces the entries of the sources it
handled and keeps those of earlier runs whose outputs are still there, each with the run that
produced it (``run``) and that run's settings under ``runs``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sfmed.core.atomic import atomic_write_text
from sfmed.data.worker import DROP_REASONS

logger = logging.getLogger(__name__)

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


def build_report(
    sources: dict[str, dict], settings: dict[str, Any], runs: dict[str, dict] | None = None
) -> dict[str, Any]:
    """Per source (as given), per group and overall totals; rejected sources count in neither.

    ``runs`` maps each run id named by a source's ``run`` to that run's settings (default: the
    one run of ``settings``).
    """
    groups: dict[str, dict] = {}
    total = empty_stats()
    if runs is None:
        runs = {settings["run"]: settings} if settings.get("run") else {}
    for s in sources.values():
        if s.get("rejected"):
            continue
        g = groups.setdefault(s.get("group", "other"), {**empty_stats(), "sources": []})
        g["sources"].append(s["name"])
        _add(g, s)
        _add(total, s)
    return {
        "settings": settings,
        "runs": runs,
        "sources": sources,
        "groups": groups,
        "total": total,
    }


def merge_previous(output_dir: str | Path, report: dict[str, Any]) -> dict[str, Any]:
    """``report`` with the sources of earlier runs in ``output_dir`` that this run did not
    handle and whose outputs are still complete (their sidecar exists), each with its run."""
    from sfmed.data.metadata import sidecar_path

    old_file = Path(output_dir) / "report.json"
    try:
        old = json.loads(old_file.read_text(encoding="utf-8"))
        old_sources = dict(old.get("sources") or {})
        old_runs = dict(old.get("runs") or {})
    except FileNotFoundError:
        return report
    except (OSError, ValueError, AttributeError) as e:
        logger.warning("%s is unreadable (%s); it is replaced by this run's report", old_file, e)
        return report
    sources = dict(report["sources"])
    for name, s in old_sources.items():
        if name in sources or s.get("rejected") or not isinstance(s, dict):
            continue
        prefix = s.get("prefix")
        if prefix and sidecar_path(prefix).is_file():
            sources[name] = s
    runs = dict(report.get("runs") or {})
    for s in sources.values():
        r = s.get("run")
        if r and r not in runs and r in old_runs:
            runs[r] = old_runs[r]
    return build_report(sources, report["settings"], runs)


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
    cells += [f"{s['documents']:,}", f"{s['tokens']:,}"]
    if bold:
        cells = [f"**{c}**" if c else c for c in cells]
    return "| " + " | ".join(cells) + " |"


def _share(tokens: int, total: int) -> str:
    return f"{100.0 * tokens / total:.1f}%" if total else "-"


def summary_table(report: dict[str, Any]) -> list[str]:
    """The SFMed-shaped table: corpus, records, tokens, share of all tokens; per group a
    subtotal (medical, general, ...), then the total."""
    total = report["total"]["tokens"]
    lines = [
        "| 数据集名称 (corpus) | group | 数据集条数 (records) | 数据集Token数 (tokens) | 占比 (share) |",
        "|---|---|---:|---:|---:|",
    ]
    for g, gs in report["groups"].items():
        for name in gs["sources"]:
            s = report["sources"][name]
            lines.append(
                f"| {name} | {g} | {s['documents']:,} | {_fmt_tokens(s['tokens'])} | "
                f"{_share(s['tokens'], total)} |"
            )
        lines.append(
            f"| **{g} subtotal** | **{g}** | **{gs['documents']:,}** | "
            f"**{_fmt_tokens(gs['tokens'])}** | **{_share(gs['tokens'], total)}** |"
        )
    t = report["total"]
    lines.append(
        f"| **total** | | **{t['documents']:,}** | **{_fmt_tokens(t['tokens'])}** | "
        f"**{_share(t['tokens'], total)}** |"
    )
    return lines


def _run_line(run_id: str, st: dict[str, Any], names: list[str]) -> str:
    tok = st.get("tokenizer") or {}
    return (
        f"- run `{run_id}` ({', '.join(names)}): tokenizer `{tok.get('path')}` (hash "
        f"`{tok.get('hash')}`, backend {tok.get('backend')}, EOD `{tok.get('eod_token')}` = "
        f"{tok.get('eod_id')}); clean={str(st.get('clean')).lower()}, dedup={st.get('dedup')}, "
        f"strict={str(st.get('strict')).lower()}."
    )


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the summary table (corpus, records, tokens, share, group
    subtotals), then the accounting table (every record kept or dropped for one reason), the
    runs that produced the outputs, rejected sources and malformed-record samples."""
    reasons = list(DROP_REASONS)
    st = report["settings"]
    lines = ["# Pretraining data report", "", *summary_table(report), ""]
    lines += [
        "Records are documents written; tokens include one EOD per document; share is of all "
        "tokens in this folder.",
        "",
        "## Accounting",
        "",
        "Every record read is either kept or dropped for exactly one reason.",
        "",
        "| source | group | files | records read | kept | "
        + " | ".join(_LABELS[r] for r in reasons)
        + " | documents | tokens |",
        "|" + "---|" * 2 + "---:|" * (3 + len(reasons) + 2),
    ]
    for name, s in report["sources"].items():
        label = name + (" (reused)" if s.get("reused") else "")
        label += " (rejected)" if s.get("rejected") else ""
        lines.append(_row(label, s.get("group", ""), s, reasons))
    for g, s in report["groups"].items():
        lines.append(_row(f"{g} total", g, s, reasons, bold=True))
    lines.append(_row("total", "", report["total"], reasons, bold=True))
    runs = report.get("runs") or {}
    if runs:
        lines += ["", "## Runs", ""]
        for run_id, rs in sorted(runs.items()):
            names = [n for n, s in report["sources"].items() if s.get("run") == run_id]
            lines.append(_run_line(run_id, rs, names))
    rejected = [(n, s["rejected"]) for n, s in report["sources"].items() if s.get("rejected")]
    if rejected:
        lines += ["", "## Rejected sources (no outputs)", ""]
        lines += [f"- {msg}" for _, msg in rejected]
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
