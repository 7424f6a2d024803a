"""Throughput accounting (FLOPs, MFU) and the three sinks of training metrics.

FLOPs per token follow the published convention (Kaplan et al.; PaLM appendix B; Megatron-LM):

* ``6 · N_matmul`` for the weight matmuls, forward + backward (N_matmul = the parameters that take
  part in matmuls: QKV, output projection, SwiGLU MLP, the LM head; not the embedding lookup);
* ``12 · L · s · (heads · head_dim)`` for attention scores and the weighted sum over ``s`` keys —
  the **full** convention (PaLM, Megatron-LM). Causal attention only needs half of it, the
  **causal** convention (``6 · L · s · ...``, FlashAttention / torchtitan). Both are reported:
  ``mfu`` is full, ``mfu_causal`` the causal one.

Recomputed activations are not counted (that would be HFU). Every logged step goes to the
console (rank 0), ``<run dir>/metrics.jsonl`` and wandb.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import sys
from pathlib import Path

import torch

from sfmed.core.atomic import atomic_file
from sfmed.models import ModelArch

log = logging.getLogger(__name__)

# Dense (no sparsity) peak TFLOP/s per GPU, from NVIDIA's data sheets.
_PEAKS = (
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0}),
    ("H800", {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0}),
    ("H20", {"bf16": 148.0, "fp16": 148.0, "fp8": 296.0, "fp32": 44.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
)


def matmul_params(arch: ModelArch, vocab: int) -> int:
    """Parameters that take part in matmuls (per-token FLOPs = 2 × this in the forward)."""
    h, q = arch.hidden_size, arch.num_attention_heads * arch.kv_channels
    kv = arch.num_query_groups * arch.kv_channels
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * arch.ffn_hidden_size
    return arch.num_layers * per_layer + h * vocab


def flops_per_token(arch: ModelArch, seq_length: int, vocab: int, causal: bool = False) -> float:
    """Training FLOPs per token (forward + backward), full or causal attention convention."""
    q = arch.num_attention_heads * arch.kv_channels
    attn = (6 if causal else 12) * arch.num_layers * seq_length * q
    return 6.0 * matmul_params(arch, vocab) + attn


def peak_tflops(precision: str, override: float | None = None) -> float | None:
    """The per-GPU dense peak for ``precision`` (``override`` wins; None on unknown devices)."""
    if override:
        return float(override)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in _PEAKS:
        if key in name:
            return peaks.get(precision)
    return None


def memory_gb(cuda: bool) -> dict:
    """Peak allocated / reserved GPU memory (GB), or this process's RSS on CPU."""
    if cuda:
        return {
            "mem_alloc_gb": torch.cuda.max_memory_allocated() / 2**30,
            "mem_reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
        }
    import psutil

    return {"mem_rss_gb": psutil.Process().memory_info().rss / 2**30}


class MetricsSink:
    """Console line + ``metrics.jsonl`` + wandb, written by one rank (the others no-op)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool,
        wandb_cfg=None,
        run_name: str = "",
        config: dict | None = None,
        resume_step: int = 0,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            self._wandb = _init_wandb(Path(run_dir), wandb_cfg, run_name, config or {})

    def _truncate_after(self, step: int) -> None:
        # Records of steps after the resumed checkpoint were made by a run that died; the
        # resumed run logs those steps again, so the file stays one record per step.
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        with atomic_file(self.path) as f:
            f.write("".join(k + "\n" for k in keep))

    def log(self, record: dict, console: str | None = None) -> None:
        """Append ``record`` to metrics.jsonl, send it to wandb, print ``console``."""
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self._wandb is not None:
            step = clean.get("step")
            self._wandb.log({k: v for k, v in clean.items() if v is not None}, step=step)
        if console:
            log.info(console)

    def close(self) -> None:
        """Finish the wandb run."""
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _init_wandb(run_dir: Path, cfg, run_name: str, config: dict):
    import wandb

    # One wandb run per training run: a resumed job continues the same wandb run.
    id_file = run_dir / "wandb_run_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    if not id_file.is_file():
        id_file.write_text(run_id + "\n")
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name or run_name,
        tags=list(cfg.tags),
        group=cfg.group,
        dir=cfg.dir or str(run_dir),
        mode=cfg.mode,
        id=run_id,
        resume="allow",
        config=config,
    )


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss`` (``-`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_count(n: float) -> str:
    """``12.3k``, ``4.56M``, ``7.89B``."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


class Progress:
    """Where the run is and when it will end: step/total, tokens this session, ETA, last loss.

    On a terminal (rank 0) a live ``rich`` progress bar; elsewhere (Slurm logs, pipes) nothing
    live — the periodic step lines carry the same numbers (:func:`console_line`). The ETA is the
    mean step time of this session (evaluation and checkpointing included) × the steps left.
    """

    def __init__(self, total: int, start_step: int, *, enabled: bool, console=None):
        import time

        self._clock = time.perf_counter
        self.total, self.start_step = total, start_step
        self.t0 = self._clock()
        self.tokens = 0.0
        self.live = None
        if not enabled or (console is None and not sys.stderr.isatty()):
            return  # plain step lines (Slurm logs, pipes); rich is not even imported
        try:
            from rich.console import Console
        except ImportError:  # optional on a minimal GPU install: plain lines instead
            return

        console = console or Console(stderr=True)
        if not console.is_terminal:
            return
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.live = RichProgress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[tokens]} tokens"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self.live.add_task(
            "train", total=total, completed=start_step, tokens="0", loss="-"
        )
        self.live.start()
        # Log records go above the bar: point rank 0's stream handlers at rich's proxy.
        self._streams = []
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and h.stream in (
                sys.__stderr__,
                sys.__stdout__,
            ):
                self._streams.append((h, h.stream))
                h.setStream(sys.stderr)

    def eta_s(self, step: int) -> float | None:
        """Seconds left at ``step``, from this session's mean step time."""
        done = step - self.start_step
        if done <= 0:
            return None
        return (self._clock() - self.t0) / done * (self.total - step)

    def snapshot(self, step: int) -> dict:
        """``{"eta_s", "tokens_seen"}`` at ``step``, for the step's record."""
        return {"eta_s": self.eta_s(step), "tokens_seen": self.tokens}

    def update(self, step: int, tokens: float, loss: float | None) -> None:
        """Record a finished step (every step; cheap)."""
        self.tokens += tokens
        if self.live is not None:
            self.live.update(
                self._task,
                completed=step,
                tokens=format_count(self.tokens),
                loss="-" if loss is None else f"{loss:.4f}",
            )

    def close(self) -> None:
        """Stop the live display (idempotent)."""
        if self.live is not None:
            self.live.stop()
            for h, stream in self._streams:
                h.setStream(stream)
            self.live = None


def console_line(r: dict) -> str:
    """The rank-0 console summary of one step."""
    parts = [
        f"step {r['step']}/{r['steps']}",
        f"loss {r['loss']:.4f}",
        f"lr {r['lr']:.3e}",
        f"grad_norm {r['grad_norm']:.3f}" if r.get("grad_norm") is not None else "grad_norm -",
        f"{r['tokens_per_s']:,.0f} tok/s",
        f"{r['tflops_per_gpu']:.3g} TFLOP/s/GPU",
    ]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}% (causal {100 * r['mfu_causal']:.1f}%)")
    if "eta_s" in r:
        parts.append(f"ETA {format_duration(r['eta_s'])}")
    if r.get("tokens_seen") is not None:
        parts.append(f"{format_count(r['tokens_seen'])} tokens")
    mem = r.get("mem_alloc_gb", r.get("mem_rss_gb"))
    if mem is not None:
        parts.append(f"mem {mem:.1f}GB")
    parts.append(f"skipped {r['skipped_steps']}")
    if r.get("skip_reason"):
        parts.append(f"[{r['skip_reason']}]")
    return " | ".join(parts)
