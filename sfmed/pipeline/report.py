"""The run's summary: ``summary.md`` (what ran, where its output is, its final numbers, the
evaluation tables) and one loss-curve PNG per training stage."""

from __future__ import annotations

from pathlib import Path

from sfmed.core.atomic import atomic_file, atomic_write_text
from sfmed.pipeline.manifest import Manifest
from sfmed.pipeline.plan import Plan
from sfmed.pipeline.stages.training import read_metrics


def plot_loss(run: Path, dst: Path, title: str) -> Path | None:
    """Loss per step of the training run ``run`` as a PNG (None without metrics)."""
    rows = read_metrics(run)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(dst, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return dst


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_summary(plan: Plan, manifest: Manifest, out_dir: Path) -> Path:
    """Write ``<out_dir>/summary.md`` and the loss curves; returns the summary's path."""
    lines = [
        f"# Pipeline {manifest.data.get('recipe')}",
        "",
        f"Manifest: `{manifest.path}`",
        "",
        "| stage | kind | status | seconds | output | result |",
        "|---|---|---|---|---|---|",
    ]
    curves = []
    for ps in plan.stages:
        rec = manifest.stages.get(ps.name, {})
        res = rec.get("result") or {}
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in res.items() if k != "report")
        lines.append(
            f"| {ps.name} | {ps.kind.kind} | {rec.get('status', 'not run')} | "
            f"{rec.get('seconds', '')} | `{ps.out}` | {shown} |"
        )
        if ps.kind.training and rec.get("status") == "complete":
            png = plot_loss(ps.out, out_dir / f"loss_{ps.name}.png", f"{ps.name} ({ps.kind.kind})")
            if png:
                curves.append(png)
    if curves:
        lines += ["", "## Loss curves", ""]
        lines += [f"![{p.stem}]({p.name})" for p in curves]
    for ps in plan.stages:
        rec = manifest.stages.get(ps.name, {})
        report = (rec.get("result") or {}).get("report")
        if ps.kind.kind == "evaluate" and report and Path(report).is_file():
            lines += ["", f"## Evaluation ({ps.name})", "", Path(report).read_text().strip()]
    dst = out_dir / "summary.md"
    atomic_write_text(dst, "\n".join(lines) + "\n")
    return dst
