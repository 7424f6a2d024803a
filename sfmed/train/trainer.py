"""The shared trainer on megatron-core: plan → set up → (resume | init) → loop → close.

:func:`run` is what every training entry point calls with its composed config (a
:class:`~sfmed.config.run.RunConfig` subclass) and the recipe it chose (e.g.
``PretrainRecipe(cfg)``, :mod:`sfmed.recipes`); it takes dataclasses only (no Hydra), so tests and
notebooks call it directly under ``torchrun``. Everything that differs between stages — data,
forward step, loss, reported metrics, extra frozen models, checkpoint kind — comes from the
recipe; checkpointing, resume, the loop, metrics, exit signals and the loss guard are shared.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

import sfmed
from sfmed.config.run import RunConfig
from sfmed.core import megatron_layout as layout
from sfmed.core.atomic import atomic_write_text
from sfmed.core.distributed import destroy_distributed, init_distributed
from sfmed.core.dtypes import SHORT_NAMES
from sfmed.core.logging import setup_logging
from sfmed.models import arch_to_dict
from sfmed.recipes.base import Recipe
from sfmed.train import builder, checkpoint, loop, metrics
from sfmed.train.guard import LossGuard
from sfmed.train.plan import TrainPlan, make_plan

log = logging.getLogger("sfmed.train")

STATUS_FILE = "status.json"


def config_to_dict(cfg) -> dict:
    """The resolved config as plain JSON-able data (for metadata and wandb)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


class Trainer:
    """The objects of one training run, and the actions the loop calls on them."""

    def __init__(self, cfg: RunConfig, plan: TrainPlan, recipe: Recipe):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.cfg, self.plan, self.recipe = cfg, plan, recipe
        self.start_time = time.time()
        self.rank = dist.get_rank()
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if plan.device == "cuda"
            else torch.device("cpu")
        )
        self.seq_length = plan.seq_length
        self.tf_config = builder.make_transformer_config(cfg, plan)
        chunks = builder.build_model_chunks(cfg, plan, self.tf_config)
        self.model = builder.wrap_ddp(cfg, self.tf_config, chunks)
        self.optimizer, self.scheduler = builder.build_optimizer(cfg, plan, self.model)
        builder.configure_schedule_hooks(self.tf_config, self.model, self.optimizer)
        self.forward_backward = get_forward_backward_func()
        self.extra_models = recipe.extra_models(self)
        self.forward_step = recipe.forward_step(self)
        o = cfg.optim
        self.guard = LossGuard(
            o.nan_action,
            o.spike_action,
            o.spike_factor,
            o.spike_window,
            o.spike_min_history,
            o.max_consecutive_skips,
        )
        self.state = loop.LoopState()
        stored = SHORT_NAMES.get(plan.precision, "bfloat16")  # fp8 runs store bf16 weights
        meta = {
            "arch": arch_to_dict(dataclasses.replace(plan.arch, torch_dtype=stored)),
            "padded_vocab_size": plan.padded_vocab_size,
            "make_vocab_size_divisible_by": cfg.model.make_vocab_size_divisible_by,
            "tp": cfg.parallel.tp,
            "pp": cfg.parallel.pp,
            "vpp": plan.vpp,
            "dp": plan.dp,
            "origin": {
                "kind": recipe.kind,
                "trainer": f"sfmed {sfmed.__version__}",
                "run_name": cfg.run_name,
                "init_from": str(plan.init_from) if plan.init_from else None,
                **recipe.metadata(),
            },
            "distrib_optim_sharding_type": cfg.train.optim_ckpt_format,
            "config": config_to_dict(cfg),
        }
        self.checkpointer = checkpoint.Checkpointer(
            plan.run_dir,
            self.model,
            self.optimizer,
            self.scheduler,
            meta=meta,
            sharding_type=cfg.train.optim_ckpt_format,
            keep_last=cfg.train.keep_last,
            async_save=cfg.train.async_save,
            cuda=plan.device == "cuda",
        )
        self.flops_full = metrics.flops_per_token(
            plan.arch, self.seq_length, plan.padded_vocab_size
        )
        self.flops_causal = metrics.flops_per_token(
            plan.arch, self.seq_length, plan.padded_vocab_size, causal=True
        )
        self.peak = metrics.peak_tflops(plan.precision, cfg.logging.peak_tflops)
        self.sink: metrics.MetricsSink | None = None

    def build_frozen_model(self, ckpt_dir) -> list[torch.nn.Module]:
        """Another copy of the model in this run's layout, with ``ckpt_dir``'s weights, frozen
        (eval mode, no gradients, outside the optimizer): for a recipe's extra models."""
        chunks = builder.build_model_chunks(self.cfg, self.plan, self.tf_config)
        checkpoint.load_weights(chunks, ckpt_dir)
        for chunk in chunks:
            chunk.eval()
            chunk.requires_grad_(False)
        return chunks

    # -- state --------------------------------------------------------------------------------

    def restore(self) -> None:
        """Resume the full state, or load init weights, as the plan says."""
        plan = self.plan
        if plan.resume_from is not None:
            if plan.reshard:
                log.warning(
                    "resuming at tp=%d pp=%d from a tp=%s pp=%s checkpoint: model and optimizer "
                    "are resharded; RNG states are per-rank and start fresh",
                    self.cfg.parallel.tp,
                    self.cfg.parallel.pp,
                    plan.ckpt_meta.get("tp"),
                    plan.ckpt_meta.get("pp"),
                )
            got = self.checkpointer.load(plan.resume_from, load_rng=not plan.reshard)
            ts = got["train_state"]
            self.state.iteration = got["iteration"]
            self.state.consumed_samples = int(
                ts.get("consumed_samples", got["iteration"] * self.cfg.train.global_batch_size)
            )
            self.guard.load_state_dict(ts.get("guard", {}))
            self.recipe.load_state_dict(ts.get("recipe", {}))
            self.state.skipped_steps = self.guard.skipped_total
            self.checkpointer.last_saved = self.state.iteration
            log.info(
                "resumed from %s: step %d, %d samples consumed",
                plan.resume_from,
                self.state.iteration,
                self.state.consumed_samples,
            )
        elif plan.init_from is not None:
            checkpoint.load_weights(self.model, plan.init_from)
            # bf16 params: refresh the fp32 master copies from the loaded weights.
            self.optimizer.reload_model_params()
            log.info("initialised weights from %s (fresh optimizer)", plan.init_from)

    def train_state(self) -> dict:
        """What a checkpoint needs beyond model/optimizer/scheduler/RNG."""
        return {
            "consumed_samples": self.state.consumed_samples,
            "guard": self.guard.state_dict(),
            "tokens_per_sample": self.seq_length,
            "recipe": self.recipe.state_dict(),
        }

    def save(self) -> None:
        """Checkpoint the current step (all ranks)."""
        self.checkpointer.save(self.state.iteration, self.train_state())

    # -- reporting ----------------------------------------------------------------------------

    def log_step(self, res: loop.StepResult, step_time: float, tokens_per_s: float) -> None:
        """Report one step (rank 0 writes)."""
        world = self.plan.world_size
        tflops = tokens_per_s * self.flops_full / world / 1e12
        tflops_causal = tokens_per_s * self.flops_causal / world / 1e12
        record = {
            "step": self.state.iteration,
            "steps": self.cfg.train.steps,
            "loss": res.loss,
            "lr": self.optimizer.param_groups[0]["lr"] if self.optimizer.param_groups else None,
            "grad_norm": res.grad_norm,
            "tokens": res.tokens,
            "consumed_samples": self.state.consumed_samples,
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_gpu": tokens_per_s / world,
            # the loss tokens' share of this step applied to the window's throughput
            "loss_tokens_per_s": tokens_per_s * res.tokens / max(res.throughput_tokens, 1.0),
            "tflops_per_gpu": tflops,
            "tflops_per_gpu_causal": tflops_causal,
            "mfu": tflops / self.peak if self.peak else None,
            "mfu_causal": tflops_causal / self.peak if self.peak else None,
            "skipped_steps": self.state.skipped_steps,
            "skipped": not res.applied,
            "skip_reason": res.reason or None,
            **res.metrics,
            **metrics.memory_gb(self.plan.device == "cuda"),
        }
        if self.sink is not None:
            self.sink.log(record, metrics.console_line(record))

    def log_eval(self, report) -> None:
        """Report a validation pass (the recipe's :class:`~sfmed.recipes.base.StepReport`)."""
        if self.sink is not None:
            extra = {f"valid_{k}": v for k, v in report.metrics.items()}
            self.sink.log(
                {"step": self.state.iteration, "valid_loss": report.loss, **extra},
                f"step {self.state.iteration} | valid loss {report.loss:.4f}",
            )


def _write_status(run_dir: Path, status: str, iteration: int, steps: int, reason: str = ""):
    atomic_write_text(
        run_dir / STATUS_FILE,
        json.dumps(
            {"status": status, "iteration": iteration, "steps": steps, "reason": reason}, indent=2
        ),
    )


def _copy_hf_sidecar(src_ckpt: Path | None, run_dir: Path) -> None:
    # The converted checkpoint's HF files (config, tokenizer) travel with the run, so that
    # `launch/convert.py to=hf src=<run dir>` exports a complete HF folder.
    if src_ckpt is None:
        return
    for cand in (src_ckpt.parent / layout.HF_SIDECAR, src_ckpt / layout.HF_SIDECAR):
        if cand.is_dir() and not (run_dir / layout.HF_SIDECAR).exists():
            tmp = run_dir / f".{layout.HF_SIDECAR}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(cand, tmp)
            tmp.rename(run_dir / layout.HF_SIDECAR)
            return


def run(cfg: RunConfig, recipe: Recipe) -> str:
    """Train ``recipe`` as ``cfg`` says; returns 'complete' or 'interrupted'. Call under
    torchrun (every rank)."""
    plan = make_plan(cfg, recipe)  # every config error is raised here, before any process group
    info = init_distributed(
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        cp=cfg.parallel.cp,
        vpp=plan.vpp,
        device=plan.device,
        seed=cfg.train.seed,
    )
    setup_logging(cfg.logging.level, info.rank)
    log.info("plan: %s; %s", plan.describe(), recipe.describe(plan))
    trainer, signals = None, None
    try:
        if info.rank == 0:
            plan.run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.clean_incomplete(plan.run_dir)
            _copy_hf_sidecar(plan.resume_from or plan.init_from, plan.run_dir)
        dist.barrier()
        trainer = Trainer(cfg, plan, recipe)
        trainer.restore()
        st = trainer.state
        trainer.sink = metrics.MetricsSink(
            plan.run_dir,
            enabled=info.rank == 0,
            wandb_cfg=cfg.logging.wandb,
            run_name=cfg.run_name,
            config=config_to_dict(cfg),
            resume_step=st.iteration,
        )
        if st.iteration >= cfg.train.steps:
            log.info("nothing to do: the run is at step %d of %d", st.iteration, cfg.train.steps)
            status = "complete"
        else:
            train_ds, valid_ds = recipe.build_datasets(plan)
            train_iters = recipe.iterators(
                train_ds, st.consumed_samples, plan, trainer.model,
                total=cfg.train.steps * cfg.train.global_batch_size,
            )  # fmt: skip
            signals = loop.ExitSignals(cfg.train.exit_signals)
            log.info("training steps %d..%d", st.iteration + 1, cfg.train.steps)
            status = loop.run_loop(trainer, train_iters, valid_ds, signals)
        trainer.checkpointer.close()
    except BaseException as e:
        # No collectives here: other ranks may be gone. torchrun tears the job down.
        if info.rank == 0 and plan.run_dir.is_dir():
            it = trainer.state.iteration if trainer is not None else 0
            _write_status(plan.run_dir, "failed", it, cfg.train.steps, f"{type(e).__name__}: {e}")
        raise
    finally:
        if signals is not None:
            signals.restore()
        if trainer is not None and trainer.sink is not None:
            trainer.sink.close()
    if info.rank == 0:
        _write_status(plan.run_dir, status, trainer.state.iteration, cfg.train.steps)
        log.info("run %s at step %d (%s)", status, trainer.state.iteration, plan.run_dir)
    destroy_distributed()
    return status


def launch(prog: str, cfg, recipe_cls: type[Recipe]) -> str:
    """What a training entry point's ``@hydra.main`` function does with the composed config:
    validate it into the typed schema, train ``recipe_cls``, and exit through
    :func:`sfmed.core.cli.run_cli` (a user error: one message on rank 0, exit 2)."""
    from omegaconf import OmegaConf

    from sfmed.core.cli import is_rank0, run_cli

    def _train() -> str:
        conf = OmegaConf.to_object(cfg)  # the typed schema; __post_init__ validates
        return run(conf, recipe_cls(conf))

    status = run_cli(prog, _train)
    if is_rank0():
        print(f"{prog}: {status}", flush=True)
    return status
