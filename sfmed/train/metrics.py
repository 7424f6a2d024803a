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
    mem = r.get("mem_alloc_gb", r.get("mem_rss_gb"))
    if mem is not None:
        parts.append(f"mem {mem:.1f}GB")
    parts.append(f"skipped {r['skipped_steps']}")
    if r.get("skip_reason"):
        parts.append(f"[{r['skip_reason']}]")
    return " | ".join(parts)
