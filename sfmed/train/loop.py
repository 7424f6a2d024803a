"""The training loop: steps through megatron-core's pipeline schedules, guard, logs, saves, exits.

One step = zero the DDP grad buffers → ``forward_backward_func`` over all micro-batches (1F1B,
interleaved with virtual stages) → sum the recipe's reports over the global batch → the recipe
turns them into the step's loss, token counts and metrics → loss guard → LR schedule + optimizer
step. Every rank leaves the loop at the same step: exit signals and the
wall-clock limit are all-reduced at each step boundary.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Test/fault-drill hook: after this step (and its checkpoint) every rank sleeps until killed, so a
# test can SIGKILL a run at a known point. Never set in normal use.
FAULT_ENV = "SFMED_FAULT_SLEEP_AFTER_STEP"


class TrainingStopped(RuntimeError):
    """The loss guard stopped the run (NaN/Inf or a spike with action=stop)."""


@dataclass
class LoopState:
    """Where the run is: steps done, samples consumed, skip counters."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    extra: dict = field(default_factory=dict)


class ExitSignals:
    """Records configured signals so the loop can save and exit at the next step boundary.

    The first signal is recorded (and announced once, by the rank with ``announce``); a second
    SIGINT — Ctrl-C pressed again — stops at once (``KeyboardInterrupt``, no checkpoint).
    """

    def __init__(self, names: list[str], announce: bool = True):
        self.received: str | None = None
        self.announce = announce
        self._old = {}
        for name in dict.fromkeys(names):
            sig = getattr(signal, name)
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received and signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt
        if self.received:
            return
        self.received = name
        if self.announce:
            hint = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            log.warning(
                "received %s: saving a checkpoint and exiting after this step%s", name, hint
            )

    def restore(self) -> None:
        """Put back the previous handlers."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def ignore_exit_signals(names: list[str]) -> None:
    """Make this process ignore ``names`` and SIGINT: for data-loader workers, which torchrun's
    signal (sent to each rank's whole process group) would otherwise kill mid-step, losing the
    run; the rank saves and then ends its workers itself."""
    for name in [*names, "SIGINT"]:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def _device_tensor(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


def reduce_reports(losses: list[dict], widths: dict[str, int], device) -> dict[str, list[float]]:
    """Every report of a step summed over micro-batches and ranks, identical on every rank.

    ``losses`` holds what the loss functions returned (last pipeline stage only; empty
    elsewhere); ``widths`` is the recipe's ``reports`` (name -> tensor width), which fixes the
    layout of the one all-reduce. Sums are float64.
    """
    from megatron.core import parallel_state as ps

    names = list(widths)
    t = torch.zeros(sum(widths.values()), dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
        unknown = set().union(*(d.keys() for d in losses)) - set(names)
        if unknown:
            raise RuntimeError(
                f"the loss function reported {sorted(unknown)}, which the recipe's reports "
                f"({names}) do not declare"
            )
        parts = [
            torch.stack([d[n].double().view(-1) for d in losses]).sum(0).to(device) for n in names
        ]
        t += torch.cat(parts)
        # TP ranks of the last stage hold the same numbers: count them once.
        if ps.get_tensor_model_parallel_rank() != 0:
            t.zero_()
    dist.all_reduce(t)
    out, i = {}, 0
    for n in names:
        out[n] = [float(v) for v in t[i : i + widths[n]]]
        i += widths[n]
    return out


def should_exit(signals: ExitSignals | None, deadline: float | None, device) -> str | None:
    """The reason to stop now, agreed by all ranks (signal on any rank, or time limit)."""
    local = 0.0
    if signals is not None and signals.received:
        local = 1.0
    if deadline is not None and time.time() >= deadline:
        local = max(local, 2.0)
    t = _device_tensor([local], device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    code = int(t.item())
    return {0: None, 1: "signal", 2: "time limit"}[code]


@dataclass
class StepResult:
    """Outcome of one training step."""

    loss: float
    tokens: float
    """Tokens the loss averages over."""
    grad_norm: float | None
    applied: bool
    reason: str = ""
    throughput_tokens: float = 0.0
    """Tokens processed (the recipe's count for tokens/s and MFU)."""
    metrics: dict = field(default_factory=dict)
    """The recipe's further numbers."""


def _forward_backward(ctx, data_iterators, forward_only: bool):
    # The recipe says the activation shape between pipeline stages (packed SFT sends a
    # micro-batch as one [mbs * seq, 1] THD sequence).
    seq_length, mbs = ctx.recipe.schedule_shape(ctx.plan)
    return ctx.forward_backward(
        forward_step_func=ctx.forward_step,
        data_iterator=data_iterators if len(ctx.model) > 1 else data_iterators[0],
        model=ctx.model,
        num_microbatches=ctx.plan.num_microbatches,
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def train_step(ctx, data_iterators) -> StepResult:
    """One optimizer step over ``num_microbatches`` micro-batches (see module docstring)."""
    for m in ctx.model:
        m.zero_grad_buffer()
    ctx.optimizer.zero_grad()
    ctx.recipe.prepare_step(ctx, data_iterators)
    losses = _forward_backward(ctx, data_iterators, forward_only=False)
    rep = ctx.recipe.summarize(reduce_reports(losses, ctx.recipe.reports, ctx.device))
    loss, tokens = rep.loss, rep.loss_tokens
    done = {"throughput_tokens": rep.tokens, "metrics": rep.metrics}
    verdict = ctx.guard.check(loss)
    if verdict.action == "stop":
        raise TrainingStopped(f"stopping the run: {verdict.reason}")
    if verdict.action == "skip":
        log.warning("skipping the update of step %d: %s", ctx.state.iteration + 1, verdict.reason)
        return StepResult(loss, tokens, None, False, verdict.reason, **done)
    # The LR of step k is the schedule's value at k (Megatron-LM steps it after the update,
    # which makes the first warmup step use lr=0).
    ctx.scheduler.step(increment=1)
    ok, grad_norm, _ = ctx.optimizer.step()
    if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
        raise TrainingStopped(
            f"non-finite gradient norm {grad_norm} at step {ctx.state.iteration + 1} with a "
            "finite loss; the update was applied, so the run stops (resume from the last "
            "checkpoint, perhaps with a lower optim.lr)"
        )
    if not ok:  # fp16 loss-scale overflow: megatron skipped the update itself
        ctx.guard.skipped_total += 1
        return StepResult(loss, tokens, None, False, "fp16 overflow", **done)
    ctx.guard.accept(loss)
    gn = None if grad_norm is None else float(grad_norm)
    return StepResult(loss, tokens, gn, True, **done)


def evaluate(ctx, valid_dataset):
    """The recipe's report over ``train.eval_iters`` global batches of ``valid_dataset``."""
    for m in ctx.model:
        m.eval()
    iters = ctx.recipe.iterators(valid_dataset, 0, ctx.plan, ctx.model)
    totals = {n: [0.0] * w for n, w in ctx.recipe.reports.items()}
    with torch.no_grad():
        for _ in range(ctx.cfg.train.eval_iters):
            ctx.recipe.prepare_step(ctx, iters)
            losses = _forward_backward(ctx, iters, forward_only=True)
            for n, v in reduce_reports(losses, ctx.recipe.reports, ctx.device).items():
                totals[n] = [a + b for a, b in zip(totals[n], v, strict=True)]
    for m in ctx.model:
        m.train()
    return ctx.recipe.summarize(totals)


def run_loop(ctx, train_iters, valid_dataset, signals: ExitSignals | None) -> str:
    """Train until ``train.steps`` (or an exit request); return 'complete' or 'interrupted'."""
    cfg, st = ctx.cfg, ctx.state
    t_cfg = cfg.train
    deadline = (
        ctx.start_time + 60 * t_cfg.exit_duration_minutes if t_cfg.exit_duration_minutes else None
    )
    fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
    gbs = t_cfg.global_batch_size
    window_start, window_steps, window_tokens, paused = time.perf_counter(), 0, 0, 0.0
    while st.iteration < t_cfg.steps:
        reason = should_exit(signals, deadline, ctx.device)
        if reason:
            if ctx.rank == 0:
                log.warning("exit requested (%s) at step %d", reason, st.iteration)
            ctx.save()
            return "interrupted"
        res = train_step(ctx, train_iters)
        st.iteration += 1
        st.consumed_samples += gbs
        st.skipped_steps = ctx.guard.skipped_total
        window_steps += 1
        window_tokens += res.throughput_tokens
        if getattr(ctx, "progress", None) is not None:
            ctx.progress.update(st.iteration, res.throughput_tokens, res.loss)
        if st.iteration % cfg.logging.interval == 0 or st.iteration == t_cfg.steps:
            if ctx.plan.device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - window_start - paused
            ctx.log_step(res, elapsed / window_steps, window_tokens / elapsed)
            window_start, window_steps, window_tokens, paused = time.perf_counter(), 0, 0, 0.0
        t0 = time.perf_counter()  # throughput excludes evaluation and checkpointing
        ctx.checkpointer.maybe_finalize()
        if t_cfg.eval_interval and st.iteration % t_cfg.eval_interval == 0 and valid_dataset:
            ctx.log_eval(evaluate(ctx, valid_dataset))
        if t_cfg.save_interval and st.iteration % t_cfg.save_interval == 0:
            ctx.save()
        paused += time.perf_counter() - t0
        if fault_step and st.iteration == fault_step:
            ctx.checkpointer.close()
            log.warning("%s=%d: sleeping until killed", FAULT_ENV, fault_step)
            while True:
                time.sleep(60)
    if t_cfg.save_final and ctx.checkpointer.last_saved != st.iteration:
        ctx.save()
    return "complete"
