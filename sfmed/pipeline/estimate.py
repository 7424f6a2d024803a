"""Dry-run numbers: the token budget per corpus and GPU-hours per training stage."""

from __future__ import annotations

from sfmed.config.pipeline import PipelineConfig

# Training FLOPs per parameter per token: forward + backward = 6; DPO adds the frozen
# reference model's forward (2) over the same tokens.
FLOPS_PER_PARAM_TOKEN = {"pretrain": 6, "sft": 6, "dpo": 8}


def _tokens(v: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def budget_lines(cfg: PipelineConfig) -> list[str]:
    """The recipe's corpora with their token targets, grouped, with group totals."""
    corpora = cfg.recipe.corpora
    if not corpora:
        return []
    lines = ["token budget per corpus:"]
    groups: dict[str, float] = {}
    w = max(len(c.name) for c in corpora)
    for c in corpora:
        if c.tokens is not None:
            groups[c.group] = groups.get(c.group, 0.0) + c.tokens
        shown = _tokens(c.tokens) if c.tokens is not None else "by size"
        note = f"  {c.note}" if c.note else ""
        lines.append(f"  {c.name:<{w}}  {c.group:<8} {shown:>8}{note}")
    groups.update(cfg.recipe.token_groups)  # a group target covers its corpora's shares
    for g, t in groups.items():
        lines.append(f"  {'= ' + g:<{w}}  {'':<8} {_tokens(t):>8}")
    lines.append(f"  {'= all':<{w}}  {'':<8} {_tokens(sum(groups.values())):>8}")
    return lines


def gpu_hours(kind: str, params: float, tokens: float, mfu: float, peak_tflops: float) -> float:
    """GPU-hours of a training stage: FLOPs / (MFU x peak) / 3600."""
    flops = FLOPS_PER_PARAM_TOKEN[kind] * params * tokens
    return flops / (mfu * peak_tflops * 1e12) / 3600


def compute_lines(
    cfg: PipelineConfig, stage_tokens: dict[str, tuple[str, float | None]]
) -> list[str]:
    """GPU-hours per training stage (``stage_tokens``: name -> (kind, tokens or None))."""
    if not stage_tokens:
        return []
    e = cfg.estimate
    params = cfg.recipe.model_params
    lines = [
        f"compute at MFU {e.mfu:.0%} of {e.peak_tflops:g} TFLOP/s per GPU"
        + (f", {params / 1e9:.2f}B parameters:" if params else " (set recipe.model_params):")
    ]
    total = 0.0
    for name, (kind, tokens) in stage_tokens.items():
        if tokens is None or not params:
            lines.append(f"  {name:<12} {kind:<8} tokens unknown")
            continue
        h = gpu_hours(kind, params, tokens, e.mfu, e.peak_tflops)
        total += h
        lines.append(f"  {name:<12} {kind:<8} {_tokens(tokens):>8} tokens  {h:10.1f} GPU-hours")
    if params:
        lines.append(f"  {'total':<12} {'':<8} {'':>8}         {total:10.1f} GPU-hours")
    return lines
