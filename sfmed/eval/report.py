"""Writing results: the JSON with every record, a Markdown table in the seed report's shape, and
a PNG chart where a picture reads better. Everything is written atomically, JSON last, so a
finished ``<task>.json`` means the run completed.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from sfmed.core.atomic import atomic_file, atomic_write_text

logger = logging.getLogger(__name__)

_CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
)


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def pct(x: float) -> str:
    """0.52341 → ``52.34`` (percent, two decimals)."""
    return f"{100 * x:.2f}"


def wtl(win: float, tie: float, lose: float) -> str:
    """SFMed's ``win/tie/lose`` cell, e.g. ``0.7544/0.0/0.2456``."""
    return "/".join(str(round(x, 4)) for x in (win, tie, lose))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager
    from matplotlib import pyplot as plt

    names = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [n for n in _CJK_FONTS if n in names]
    plt.rcParams["font.sans-serif"] = [*cjk, "DejaVu Sans"]
    plt.rcParams["axes.unicode_minus"] = False
    return plt


def _save(fig, path: Path) -> None:
    with atomic_file(path, "wb") as f, warnings.catch_warnings():
        # Without a CJK font installed, Chinese labels render as boxes: a warning per glyph.
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})


def chart_win_tie_lose(path: Path, rows: Sequence[tuple[str, float, float, float]], title: str):
    """Horizontal stacked bars: win (green), tie (grey), lose (red) per row label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.4))
    labels = [r[0] for r in rows]
    left = [0.0] * len(rows)
    for k, (name, color) in enumerate(
        (("win", "#4caf50"), ("tie", "#bdbdbd"), ("lose", "#e57373"))
    ):
        vals = [r[k + 1] for r in rows]
        ax.barh(labels, vals, left=left, color=color, label=name)
        for y, (x0, v) in enumerate(zip(left, vals)):
            if v >= 0.06:
                ax.text(x0 + v / 2, y, f"{v:.2f}", ha="center", va="center", fontsize=9)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_title(title)
    ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.08), frameon=False)
    _save(fig, path)
    plt.close(fig)


def value_axis(values: Sequence[float], top: float | None = None) -> tuple[float, float]:
    """Limits of a bar chart's value axis: from 0, to ``top`` (e.g. 100 for percentages) or a
    little above the largest value; 1 when every value is 0 (never a range around zero)."""
    if top is not None:
        return 0.0, float(top)
    hi = max([0.0, *values])
    return 0.0, hi * 1.12 if hi > 0 else 1.0


def chart_bars(
    path: Path,
    labels: Sequence[str],
    values: Sequence[float],
    title: str,
    ylabel: str,
    top: float | None = None,
) -> tuple[float, float]:
    """Vertical bars with their values written on top; returns the value axis limits."""
    return chart_grouped_bars(path, labels, {"": list(values)}, title, ylabel, top)


def chart_grouped_bars(
    path: Path,
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    title: str,
    ylabel: str,
    top: float | None = None,
) -> tuple[float, float]:
    """Bars per group (x), one colour per series (e.g. benchmarks × models); axis from 0.

    Returns the value axis limits as drawn.
    """
    plt = _pyplot()
    k = max(1, len(series))
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(groups) * k + 2), 3.6))
    colors = ["#5c8ee6", "#f0a04b", "#6cc070", "#d9605a", "#9b7fd1", "#8c8c8c"]
    for j, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        bars = ax.bar(xs, values, width=width, color=colors[j % len(colors)], label=name or None)
        for b, v in zip(bars, values):
            ax.text(
                b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7
            )
    ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 4 else 0, ha="right")
    lims = value_axis([v for vs in series.values() for v in vs], top)
    ax.set_ylim(*lims)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8, frameon=False)
    _save(fig, path)
    got = tuple(float(x) for x in ax.get_ylim())
    plt.close(fig)
    return got


def write_outputs(
    out_dir: Path,
    task: str,
    result: dict,
    markdown: str,
    chart: Callable[[Path], None] | None = None,
) -> dict[str, str]:
    """Write ``<task>.md``, ``<task>.png`` (if a chart is given) and ``<task>.json`` (last)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": str(out_dir / f"{task}.md")}
    atomic_write_text(out_dir / f"{task}.md", markdown.rstrip() + "\n")
    if chart is not None:
        chart(out_dir / f"{task}.png")
        paths["chart"] = str(out_dir / f"{task}.png")
    paths["json"] = str(out_dir / f"{task}.json")
    atomic_write_text(
        out_dir / f"{task}.json", json.dumps(result, ensure_ascii=False, indent=1) + "\n"
    )
    logger.info("wrote %s", ", ".join(paths.values()))
    return paths
