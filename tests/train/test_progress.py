"""Rank 0's progress: a live rich bar on a terminal, the same numbers (step/total, tokens, ETA,
loss) in the periodic plain lines elsewhere (Slurm logs)."""

from __future__ import annotations

import io

from rich.console import Console

from sfmed.train.metrics import Progress, console_line, format_count, format_duration


def _record(step: int, **extra) -> dict:
    return {
        "step": step, "steps": 10, "loss": 2.5, "lr": 1e-4, "grad_norm": 1.0,
        "tokens_per_s": 100.0, "tflops_per_gpu": 0.1, "skipped_steps": 0, **extra,
    }  # fmt: skip


def test_eta_is_the_mean_step_time_times_the_steps_left():
    p = Progress(total=10, start_step=4, enabled=False)  # resumed at step 4
    p.t0, p._clock = 100.0, lambda: 106.0
    assert p.eta_s(4) is None  # no step of this session yet
    p.update(5, 512, 3.0)
    p.update(6, 512, 2.9)
    snap = p.snapshot(6)
    assert snap == {"eta_s": 3.0 * 4, "tokens_seen": 1024}  # 6 s / 2 steps × 4 left


def test_plain_lines_carry_progress_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(total=10, start_step=0, enabled=True, console=Console(file=out))
    assert p.live is None  # not a terminal: no live display
    p.update(1, 2048, 2.5)
    p.close()
    assert out.getvalue() == ""
    line = console_line(_record(1, eta_s=3725.0, tokens_seen=1_234_567))
    assert line.startswith("step 1/10 | loss 2.5000")
    assert "ETA 1:02:05" in line and "1.23M tokens" in line
    assert (
        format_duration(None) == "-"
        and format_count(999) == "999"
        and format_count(12345) == "12.3k"
    )


def test_live_bar_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    p = Progress(total=10, start_step=0, enabled=True, console=console)
    assert p.live is not None
    for step in (1, 2, 3):
        p.update(step, 4096, 3.0 - step / 10)
    p.close()
    p.close()  # idempotent
    text = out.getvalue()
    assert (
        "step 3/10" in text and "12.3k tokens" in text and "loss 2.7000" in text and "ETA" in text
    )


def test_rank_other_than_0_shows_nothing():
    out = io.StringIO()
    p = Progress(
        total=10, start_step=0, enabled=False, console=Console(file=out, force_terminal=True)
    )
    p.update(1, 10, 1.0)
    p.close()
    assert p.live is None and out.getvalue() == ""
