"""SFT with TRL's ``SFTTrainer`` on a Hugging Face folder (``launch/sft.py engine=hf``).

What it shares with the sharded engine, so that the two agree step by step (the parity gate):

* the data: the chat datasets of ``launch/preprocess.py format=sft`` (ids + role-span loss
  mask, packed or not), resolved, split and ordered by the sharded engine's own code
  (:mod:`sfmed.recipes.sft`), given to TRL as rows with precomputed labels (``dataset_kwargs.skip_prepare_dataset``), padding-free: position
  ids restart per conversation and transformers builds the block-diagonal mask (eager/SDPA) or
  the varlen boundaries (flash attention) from them;
* the loss: per-token mean over the supervised tokens of the **global** batch. transformers
  counts the supervised labels of all micro-batches of a step on all ranks
  (``num_items_in_batch``, ``average_tokens_across_devices``) and the model divides its summed
  loss by that count;
* the optimizer: AdamW with the same betas/eps/weight decay (none on biases and 1-D weights, as
  megatron-core), the same global-norm clipping, and megatron-core's own LR schedule
  (:class:`megatron.core.optimizer_param_scheduler.OptimizerParamScheduler`);
* the run folder: ``metrics.jsonl`` (step, loss, grad_norm, lr, tokens = supervised tokens of
  the global batch, throughput), ``status.json``, wandb, checkpoints (``checkpoint-N``, HF
  Trainer's format: model or adapter, optimizer, scheduler, RNG, data position).

LoRA goes through PEFT (``hf.lora.*``); at the end the run writes ``<run>/hf`` (full-parameter),
or ``<run>/merged`` (adapters folded into the base weights) and/or ``<run>/adapter``
(``PeftModel.from_pretrained`` loads it on the base) per ``hf.export``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from sfmed.core.atomic import atomic_dir, atomic_write_text
from sfmed.core.errors import ConfigError, UserError

if TYPE_CHECKING:
    from sfmed.config.sft import SFTConfig

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
EXPORTS = ("merged", "adapter", "both")
CKPT = re.compile(r"^checkpoint-(\d+)$")


# --------------------------------------------------------------------------- checks before work
def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _checkpoints(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def _check(cfg: SFTConfig) -> dict:
    """Every check that can fail, before a model or dataset is loaded; returns the plan."""
    h = cfg.hf
    missing = [
        m for m in ("trl", "peft", "accelerate", "datasets") if not importlib.util.find_spec(m)
    ]
    if missing:
        raise UserError(
            f"engine=hf needs {', '.join(missing)}: pip install 'sfmed[hf]' (TRL, PEFT, "
            "accelerate, datasets)"
        )
    if not h.model:
        raise ConfigError(
            "engine=hf needs hf.model=<Hugging Face folder> (launch/convert.py to=hf output or any "
            "HF Qwen2)"
        )
    if not (Path(h.model) / "config.json").is_file():
        raise ConfigError(f"hf.model={h.model!r} is not a Hugging Face folder (no config.json)")
    if cfg.init_from:
        raise ConfigError(
            f"init_from={cfg.init_from!r} is the sharded engine's start point; with engine=hf the "
            "model is hf.model (drop init_from)"
        )
    if h.export not in EXPORTS:
        raise ConfigError(f"hf.export={h.export!r} is not one of {list(EXPORTS)}")
    if h.lora.enabled and (h.lora.r < 1 or h.lora.alpha <= 0 or not h.lora.target_modules):
        raise ConfigError(
            f"hf.lora: r={h.lora.r} must be >= 1, alpha={h.lora.alpha} > 0 and target_modules "
            "non-empty"
        )
    if not 0 <= h.lora.dropout < 1:
        raise ConfigError(f"hf.lora.dropout={h.lora.dropout} must be in [0, 1)")
    p = cfg.parallel
    if p.tp != 1 or p.pp != 1 or p.cp != 1 or p.vpp:
        raise ConfigError(
            f"engine=hf runs data parallel only (parallel.tp={p.tp}, pp={p.pp}, cp={p.cp}); use "
            "parallel=default and `accelerate launch` for several GPUs, or engine=mcore for "
            "tensor/pipeline parallelism"
        )
    t, o = cfg.train, cfg.optim
    decay_steps = o.decay_steps or t.steps
    if o.warmup_steps >= decay_steps:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} must be smaller than the decay horizon "
            f"optim.decay_steps={decay_steps} (default: train.steps)"
        )
    if t.eval_interval:
        raise ConfigError(
            f"train.eval_interval={t.eval_interval}: engine=hf does not run validation; use "
            "train.eval_interval=0 (or engine=mcore)"
        )
    if t.precision == "fp8":
        raise ConfigError("train.precision=fp8 needs engine=mcore (Transformer Engine)")
    world = _world_size()
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size} x {world} processes"
        )
    # The sharded engine's data resolution: every dataset checked against its sidecar (kind,
    # sequence length, mask mode, packing, the tokenizer's vocabulary against the model's).
    from sfmed.recipes.sft import resolve_data

    hf_cfg = json.loads((Path(h.model) / "config.json").read_text(encoding="utf-8"))
    vocab = hf_cfg.get("vocab_size") or (hf_cfg.get("text_config") or {}).get("vocab_size")
    data = resolve_data(cfg, vocab_size=int(vocab) if vocab else None)
    run_dir = Path(cfg.ckpt_dir)
    ckpts = _checkpoints(run_dir)
    resume_from = None
    if cfg.resume == "never":
        if ckpts:
            raise UserError(
                f"{run_dir} already holds checkpoints ({ckpts[-1].name}) and resume=never; "
                "choose another run_name/ckpt_dir or resume=auto"
            )
    elif cfg.resume == "auto":
        resume_from = ckpts[-1] if ckpts else None
    else:
        resume_from = Path(cfg.resume)
        if not (resume_from / "trainer_state.json").is_file():
            raise ConfigError(
                f"resume={cfg.resume!r} is not an HF engine checkpoint (a checkpoint-N folder "
                "with trainer_state.json)"
            )
    for name in t.exit_signals:
        signal.Signals[name]  # validated by the schema; raises on typos of programmatic configs
    return {
        "data": data,
        "run_dir": run_dir,
        "resume_from": resume_from,
        "world": world,
        "grad_accum": t.global_batch_size // per_step,
    }


# --------------------------------------------------------------------------- optimizer, schedule
def param_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: decayed, and not decayed (biases and norm
    weights: megatron-core's rule of no decay for 1-D parameters); ``wd_mult`` is megatron's
    per-group factor, which its schedule applies."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # By name too: a sharded (FSDP) view of a matrix can be 1-D.
        one_d = p.ndim == 1 or name.endswith(".bias") or "norm." in name
        (no_decay if one_d else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]
    return [g for g in groups if g["params"]]


class MegatronSchedule:
    """megatron-core's ``OptimizerParamScheduler`` behind the LR-scheduler interface transformers'
    Trainer calls (``step``, ``get_last_lr``, ``state_dict``), so both engines use one schedule:
    step ``k`` (1-based) runs at the schedule's value at ``k``, as in the sharded engine (which
    differs from Megatron-LM there: Megatron-LM's first warmup step runs at lr=0)."""

    def __init__(self, optimizer, optim_cfg, steps: int):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o = optim_cfg
        self.optimizer = optimizer
        self.sched = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=o.decay_steps or steps,
            lr_decay_style=o.decay_style,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=steps,
            wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=True,
            wsd_decay_steps=o.wsd_decay_steps,
            lr_wsd_decay_style="linear",
        )
        # transformers steps the schedule after each update: the first update runs at k = 1.
        self.sched.step(1)

    def step(self) -> None:
        """Advance one optimizer step."""
        self.sched.step(1)

    def get_last_lr(self) -> list[float]:
        """The LR of every parameter group now."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """The schedule's position (its settings come from the config, as in the sharded
        engine)."""
        return {"num_steps": self.sched.num_steps}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``'s step."""
        self.sched.num_steps = int(state["num_steps"])
        self.sched.step(0)


# --------------------------------------------------------------------------- the trainer
def _trainer_class():
    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class _Signals(TrainerCallback):
        """Exit signals and the time limit: save a checkpoint and stop at the next step end."""

        def __init__(self, names: list[str], limit_min: float | None):
            self.reason = ""
            self.t0 = time.monotonic()
            self.limit = limit_min * 60 if limit_min else None
            self._old = {}
            for n in names:
                sig = signal.Signals[n]
                self._old[sig] = signal.signal(sig, self._handle)

        def _handle(self, signum, frame):
            self.reason = signal.Signals(signum).name

        def restore(self):
            for sig, h in self._old.items():
                signal.signal(sig, h)

        def on_step_end(self, args, state, control, **kw):
            if not self.reason and self.limit and time.monotonic() - self.t0 > self.limit:
                self.reason = "exit_duration_minutes"
            if self.reason:
                control.should_save = True
                control.should_training_stop = True
            return control

    class SFMedSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer in the data order given, writing sfmed's per-step records."""

        def __init__(
            self,
            *a,
            optim_cfg=None,
            sink=None,
            steps_total=0,
            flops_per_token=None,
            peak=None,
            capacity=1,
            **kw,
        ):
            self._optim_cfg = optim_cfg
            self._steps_total = steps_total
            super().__init__(*a, **kw)
            self._capacity = capacity  # samples x seq_length of a global batch
            self._sink, self._steps_total = sink, steps_total
            self._fpt, self._peak = flops_per_token, peak
            self._acc = torch.zeros(3, dtype=torch.float64)  # loss, supervised, tokens
            self._t_last = time.perf_counter()

        def create_optimizer(self, model=None):
            # Created by the Trainer after it wrapped the model (DDP / FSDP through accelerate):
            # AdamW with the sharded engine's settings and weight-decay rule.
            if self.optimizer is None:
                o = self._optim_cfg
                self.optimizer = torch.optim.AdamW(
                    param_groups(model or self.model, o.weight_decay),
                    lr=o.lr,
                    betas=(o.adam_beta1, o.adam_beta2),
                    eps=o.adam_eps,
                )
            return self.optimizer

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = MegatronSchedule(
                    optimizer or self.optimizer, self._optim_cfg, self._steps_total
                )
            return self.lr_scheduler

        def _get_train_sampler(self, *a, **kw):
            # The order is fixed by the engine (seeded, the same as the sharded engine's):
            # step k reads samples [k * global_batch, (k + 1) * global_batch).
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            sup = (inputs["labels"][..., 1:] != -100).sum().item()
            n_tok = inputs["input_ids"].numel()
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._acc += torch.tensor([loss.item(), sup, n_tok], dtype=torch.float64)
            return loss

        def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *a, **kw):
            acc = self._acc.clone().to(self.args.device)
            if self.accelerator.num_processes > 1:
                acc = self.accelerator.reduce(acc, reduction="sum")
            acc = acc.cpu()
            # Each rank's loss is its share of the global mean times the process count
            # (transformers undoes DDP's gradient averaging that way): the mean over ranks of
            # the summed micro-batch losses is the global per-token mean.
            loss = float(acc[0]) / self.accelerator.num_processes
            self._acc.zero_()
            step = self.state.global_step
            if (
                self._sink is not None
                and self._sink.enabled
                and step > getattr(self, "_logged", -1)
            ):
                self._logged = step
                now = time.perf_counter()
                dt, self._t_last = now - self._t_last, now
                if isinstance(grad_norm, torch.Tensor):
                    grad_norm = grad_norm.item()
                lr = kw.get("learning_rate")
                if lr is None:
                    lr = self._get_learning_rate()
                r = {
                    "step": step,
                    "steps": self._steps_total,
                    "loss": loss,
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "lr": float(lr),
                    "tokens": int(acc[1]),
                    "real_tokens": int(acc[2]),
                    "step_time_s": dt,
                    "tokens_per_s": float(acc[2]) / dt,
                    "loss_tokens_per_s": float(acc[1]) / dt,
                    "packing_efficiency": float(acc[2]) / self._capacity,
                    "supervised_fraction": float(acc[1]) / self._capacity,
                }
                if self._fpt:
                    tf = self._fpt * float(acc[2]) / dt / self.accelerator.num_processes / 1e12
                    r["tflops_per_gpu"] = tf
                    r["mfu"] = tf / self._peak if self._peak else None
                if step % self._log_interval == 0 or step == self._steps_total:
                    self._sink.log(r, console=_console(r))
            return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *a, **kw)

    return SFMedSFTTrainer, _Signals


def _console(r: dict) -> str:
    parts = [
        f"step {r['step']}/{r['steps']}",
        f"loss {r['loss']:.4f}",
        f"lr {r['lr']:.3e}",
        "grad_norm -" if r["grad_norm"] is None else f"grad_norm {r['grad_norm']:.3f}",
        f"{r['tokens']} supervised tokens",
        f"{r['tokens_per_s']:,.0f} tok/s",
    ]
    if r.get("mfu"):
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    return " | ".join(parts)


def _write_status(run_dir: Path, status: str, iteration: int, steps: int, reason: str = ""):
    # The sharded engine's status.json fields, so the generic sbatch script reads either.
    text = json.dumps(
        {"status": status, "iteration": iteration, "steps": steps, "reason": reason}, indent=2
    )
    atomic_write_text(run_dir / STATUS_FILE, text + "\n")


def _precision(cfg: SFTConfig, cuda: bool) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if cuda else "fp32"
    return p


# --------------------------------------------------------------------------- export
def export(trainer, tokenizer, run_dir: Path, lora: bool, what: str) -> list[Path]:
    """Write the trained model: ``hf`` (full-parameter), ``merged`` and/or ``adapter`` (LoRA)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    out = []
    if not lora:
        targets = [("hf", model)]
    else:
        targets = []
        if what in ("adapter", "both"):
            targets.append(("adapter", model))
        if what in ("merged", "both"):
            targets.append(("merged", None))
    for name, m in targets:
        with atomic_dir(run_dir / name, overwrite=True) as tmp:
            if m is None:
                import copy

                # Merge a copy: the trained PeftModel stays intact for the adapter export.
                m = copy.deepcopy(model).merge_and_unload()
            m.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        out.append(run_dir / name)
    return out


# --------------------------------------------------------------------------- entry
def run(cfg: SFTConfig) -> str:
    """Train ``cfg.hf.model`` on ``cfg.data`` with TRL's SFTTrainer; return the run status
    (``complete`` | ``interrupted`` | ``failed``)."""
    plan = _check(cfg)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig as TRLConfig

    from sfmed.hf_engine.data import ordered_rows
    from sfmed.models import arch_from_hf_config
    from sfmed.train.metrics import MetricsSink, flops_per_token, peak_tflops

    t, o, h = cfg.train, cfg.optim, cfg.hf
    run_dir: Path = plan["run_dir"]
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible; use device=cpu or auto")
    precision = _precision(cfg, cuda)
    rank = int(os.environ.get("RANK", "0"))

    # Data: the sharded engine's training samples in its seeded order: step k reads samples
    # [k * global_batch, (k + 1) * global_batch), the same in both engines.
    from sfmed.recipes.sft import SFTSamples, split_parts

    data = plan["data"]
    parts, _ = split_parts(data, cfg.data.split_weights, t.seed)
    samples = SFTSamples(data, parts, t.steps * t.global_batch_size, t.seed)
    rows = ordered_rows(samples, run_dir / "data_cache")

    tokenizer = AutoTokenizer.from_pretrained(h.model)
    if tokenizer.pad_token is None:
        # Rows are not padded (padding-free); TRL's collator still wants a pad token.
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(data.pad_id))
    # Master weights in fp32 (as the sharded engine); bf16/fp16 run as autocast.
    model = AutoModelForCausalLM.from_pretrained(
        h.model, dtype=torch.float32, attn_implementation=h.attn_implementation
    )
    # Packed rows reach the model as position ids without an attention mask; transformers
    # derives the per-conversation mask from them only when no KV cache is built.
    model.config.use_cache = False
    if h.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        peft_config = PeftLoraConfig(
            r=h.lora.r,
            lora_alpha=h.lora.alpha,
            lora_dropout=h.lora.dropout,
            target_modules=list(h.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)

    args = TRLConfig(
        output_dir=str(run_dir),
        max_steps=t.steps,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=plan["grad_accum"],
        max_grad_norm=o.clip_grad,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        logging_steps=cfg.logging.interval,
        save_strategy="steps" if t.save_interval else "no",
        save_steps=t.save_interval or 1,
        save_total_limit=t.keep_last,
        report_to=[],
        disable_tqdm=True,
        padding_free=True,
        max_length=None,
        shuffle_dataset=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        average_tokens_across_devices=True,
        dataloader_drop_last=True,
        dataloader_num_workers=cfg.data.num_workers,
        gradient_checkpointing=h.gradient_checkpointing,
    )
    arch = arch_from_hf_config(h.model)
    seq = data.seq_length
    fpt = flops_per_token(arch, seq, arch.vocab_size, causal=False)
    sink = MetricsSink(
        run_dir,
        enabled=rank == 0,
        wandb_cfg=cfg.logging.wandb,
        run_name=cfg.run_name,
        config=_config_dict(cfg),
        resume_step=_resume_step(plan["resume_from"]),
    )
    trainer_cls, signals_cls = _trainer_class()
    signals = signals_cls(list(t.exit_signals), t.exit_duration_minutes)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
        optim_cfg=o,
        callbacks=[signals],
        sink=sink,
        steps_total=t.steps,
        flops_per_token=fpt,
        peak=peak_tflops(precision, cfg.logging.peak_tflops),
        capacity=t.global_batch_size * seq,
    )
    trainer._log_interval = cfg.logging.interval
    status, reason = "failed", ""
    step = 0
    try:
        trainer.train(
            resume_from_checkpoint=str(plan["resume_from"]) if plan["resume_from"] else None
        )
        step = trainer.state.global_step
        if signals.reason:
            status, reason = "interrupted", signals.reason
        else:
            status = "complete"
            if t.save_final and trainer.accelerator.is_main_process:
                for p in export(trainer, tokenizer, run_dir, h.lora.enabled, h.export):
                    log.info("wrote %s", p)
        trainer.accelerator.wait_for_everyone()
    except BaseException as e:
        if rank == 0:
            _write_status(
                run_dir, "failed", trainer.state.global_step, t.steps, f"{type(e).__name__}: {e}"
            )
        raise
    finally:
        signals.restore()
        sink.close()
    if rank == 0:
        _write_status(run_dir, status, step, t.steps, reason)
    log.info("run %s at step %d (%s)", status, step, run_dir)
    return status


def _resume_step(ckpt: Path | None) -> int:
    if ckpt is None:
        return 0
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return int(state.get("global_step", 0))


def _config_dict(cfg) -> dict:
    try:
        return asdict(cfg)
    except TypeError:
        return {}


__all__ = ["MegatronSchedule", "export", "param_groups", "run"]
