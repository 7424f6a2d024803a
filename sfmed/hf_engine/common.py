"""What the HF engines of every stage share (``launch/sft.py engine=hf``, ``launch/dpo.py
engine=hf``): the checks before work, the sharded engine's AdamW settings and LR schedule,
exit signals, PEFT LoRA, the run folder (``status.json``, resume) and the export.

A stage module (:mod:`sfmed.hf_engine.sft`, :mod:`sfmed.hf_engine.dpo`) adds its data, its TRL
trainer and its per-step record; this module never names a stage.
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

from sfmed.core.atomic import atomic_dir, atomic_write_text
from sfmed.core.errors import ConfigError, UserError

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
EXPORTS = ("merged", "adapter", "both")
CKPT = re.compile(r"^checkpoint-(\d+)$")


# --------------------------------------------------------------------------- checks before work
def world_size() -> int:
    """Processes of the run (``accelerate launch`` / torchrun set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders of ``run_dir``, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def check_engine(cfg, validation: bool = False) -> dict:
    """The checks every HF-engine run makes before a model or dataset is loaded (``cfg`` is a
    stage config with ``hf``, ``parallel``, ``train``, ``optim``, ``resume``); returns the
    shared part of the plan: ``run_dir``, ``resume_from``, ``world``, ``grad_accum``,
    ``vocab_size`` (of ``hf.model``'s config). ``validation``: whether the stage runs
    ``train.eval_interval`` validation passes on this engine."""
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
    warmup = o.resolve_warmup(decay_steps)  # warmup_steps, or warmup_fraction of the horizon
    if warmup >= decay_steps:
        raise ConfigError(
            f"optim.warmup_steps={warmup} must be smaller than the decay horizon "
            f"optim.decay_steps={decay_steps} (default: train.steps)"
        )
    if t.eval_interval and not validation:
        raise ConfigError(
            f"train.eval_interval={t.eval_interval}: this stage's engine=hf does not run "
            "validation; use train.eval_interval=0 (or engine=mcore)"
        )
    if t.eval_interval and validation and cfg.data.split_weights[1] == 0:
        # 98/2/0, not 98,2,0: Hydra's command line reads the commas as a list
        raise ConfigError(
            f"train.eval_interval={t.eval_interval} but data.split={cfg.data.split!r} has no "
            "validation part; use e.g. data.split=98/2/0 or train.eval_interval=0"
        )
    if t.precision == "fp8":
        raise ConfigError("train.precision=fp8 needs engine=mcore (Transformer Engine)")
    world = world_size()
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size} x {world} processes"
        )
    hf_cfg = json.loads((Path(h.model) / "config.json").read_text(encoding="utf-8"))
    vocab = hf_cfg.get("vocab_size") or (hf_cfg.get("text_config") or {}).get("vocab_size")
    run_dir = Path(cfg.ckpt_dir)
    ckpts = checkpoints(run_dir)
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
        "run_dir": run_dir,
        "resume_from": resume_from,
        "world": world,
        "grad_accum": t.global_batch_size // per_step,
        "vocab_size": int(vocab) if vocab else None,
    }


def device_and_precision(cfg) -> tuple[bool, str]:
    """(CUDA used, precision): ``train.precision=auto`` is bf16 on a GPU, fp32 on CPU."""
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible; use device=cpu or auto")
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    p = cfg.train.precision
    return cuda, ("bf16" if cuda else "fp32") if p == "auto" else p


def training_args(cfg, plan: dict, cuda: bool, precision: str) -> dict:
    """The ``transformers.TrainingArguments`` fields every HF-engine stage sets the same way
    (steps, batch split, clipping, seed, precision, logging, checkpoints, data loading)."""
    t, o = cfg.train, cfg.optim
    return {
        "output_dir": str(plan["run_dir"]),
        "max_steps": t.steps,
        "per_device_train_batch_size": t.micro_batch_size,
        "gradient_accumulation_steps": plan["grad_accum"],
        "max_grad_norm": o.clip_grad,
        "seed": t.seed,
        "data_seed": t.seed,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": not cuda,
        "logging_steps": cfg.logging.interval,
        "save_strategy": "steps" if t.save_interval else "no",
        "save_steps": t.save_interval or 1,
        "save_total_limit": t.keep_last,
        "report_to": [],
        "disable_tqdm": True,
        "remove_unused_columns": False,
        # Validation (stages that run it): every train.eval_interval steps, train.eval_iters
        # global batches, micro-batches of the training size.
        "eval_strategy": "steps" if t.eval_interval else "no",
        "eval_steps": t.eval_interval or None,
        "per_device_eval_batch_size": t.micro_batch_size,
        "prediction_loss_only": True,
        "dataloader_drop_last": True,
        "dataloader_num_workers": cfg.data.num_workers,
        "gradient_checkpointing": cfg.hf.gradient_checkpointing,
    }


def load_model(cfg):
    """``hf.model`` with fp32 master weights (bf16/fp16 run as autocast, as the sharded engine)."""
    import torch
    from transformers import AutoModelForCausalLM

    h = cfg.hf
    model = AutoModelForCausalLM.from_pretrained(
        h.model, dtype=torch.float32, attn_implementation=h.attn_implementation
    )
    # transformers derives a packed row's per-sequence mask from position ids only when no KV
    # cache is built; training never needs one.
    model.config.use_cache = False
    return model


def lora_config(lora):
    """PEFT's ``LoraConfig`` for ``hf.lora``."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


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
            lr_warmup_steps=o.resolve_warmup(o.decay_steps or steps),
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


class EngineTrainerMixin:
    """Put before a TRL trainer class in the bases: the sharded engine's AdamW and schedule,
    the data in the order given, and a step clock. Set ``_optim_cfg`` and ``_steps_total``
    before ``Trainer.__init__``."""

    _optim_cfg = None
    _steps_total = 0
    _t_last = 0.0  # set to time.perf_counter() when the trainer is built

    def create_optimizer(self, model=None):
        # Created by the Trainer after it wrapped the model (DDP / FSDP through accelerate):
        # AdamW with the sharded engine's settings and weight-decay rule.
        import torch

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
        import torch

        return torch.utils.data.SequentialSampler(self.train_dataset)

    def _step_clock(self) -> float:
        """Seconds since the previous call (the first: since the trainer was built)."""
        now = time.perf_counter()
        last, self._t_last = self._t_last, now
        return now - last

    def _step_lr(self, kw: dict) -> float:
        lr = kw.get("learning_rate")
        return float(self._get_learning_rate() if lr is None else lr)


def signals_callback(names: list[str], limit_min: float | None):
    """A ``TrainerCallback`` that turns the exit signals ``names`` (and the time limit) into a
    checkpoint and a stop at the next step end; ``.reason`` says why, ``.restore()`` puts the
    previous handlers back."""
    from transformers import TrainerCallback

    class _Signals(TrainerCallback):
        def __init__(self):
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

    return _Signals()


# --------------------------------------------------------------------------- run folder
def write_status(run_dir: Path, status: str, iteration: int, steps: int, reason: str = ""):
    """``<run>/status.json`` with the sharded engine's fields (the sbatch script reads either)."""
    text = json.dumps(
        {"status": status, "iteration": iteration, "steps": steps, "reason": reason}, indent=2
    )
    atomic_write_text(run_dir / STATUS_FILE, text + "\n")


def resume_step(ckpt: Path | None) -> int:
    """The step a resumed run continues after (0 for a fresh run)."""
    if ckpt is None:
        return 0
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return int(state.get("global_step", 0))


def config_dict(cfg) -> dict:
    """``cfg`` as a plain dict for wandb (empty when it is not a dataclass)."""
    try:
        return asdict(cfg)
    except TypeError:
        return {}


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


def train_and_finish(cfg, trainer, signals, sink, tokenizer, plan: dict) -> str:
    """Run ``trainer`` (resuming ``plan['resume_from']``), export at the end of a complete run,
    write ``status.json`` and return the status (``complete`` | ``interrupted``; a failure
    writes ``failed`` and re-raises)."""
    t, h = cfg.train, cfg.hf
    run_dir: Path = plan["run_dir"]
    rank = int(os.environ.get("RANK", "0"))
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
            write_status(
                run_dir, "failed", trainer.state.global_step, t.steps, f"{type(e).__name__}: {e}"
            )
        raise
    finally:
        signals.restore()
        sink.close()
    if rank == 0:
        write_status(run_dir, status, step, t.steps, reason)
    log.info("run %s at step %d (%s)", status, step, run_dir)
    return status


__all__ = [
    "EngineTrainerMixin",
    "MegatronSchedule",
    "check_engine",
    "config_dict",
    "device_and_precision",
    "export",
    "lora_config",
    "param_groups",
    "resume_step",
    "signals_callback",
    "train_and_finish",
    "training_args",
    "write_status",
]


def train_rows(cfg, plan: dict, trainer_cls, precision: str, **trainer_kw) -> str:
    """Build the engine's trainer (``trainer_cls``, an :class:`EngineTrainerMixin` subclass) on
    ``cfg.hf.model``'s architecture with the metrics sink and signal callback every HF run has,
    train, and finish the run folder; ``trainer_kw`` are the stage's own arguments (model, args,
    train_dataset, processing_class, ...). Returns the run status."""
    import os

    from sfmed.models import arch_from_hf_config
    from sfmed.train.metrics import MetricsSink, flops_per_token, peak_tflops

    arch = arch_from_hf_config(cfg.hf.model)
    fpt = flops_per_token(arch, plan["data"].seq_length, arch.vocab_size, causal=False)
    sink = MetricsSink(
        plan["run_dir"],
        enabled=int(os.environ.get("RANK", "0")) == 0,
        wandb_cfg=cfg.logging.wandb,
        run_name=cfg.run_name,
        config=config_dict(cfg),
        resume_step=resume_step(plan["resume_from"]),
    )
    signals = signals_callback(list(cfg.train.exit_signals), cfg.train.exit_duration_minutes)
    trainer = trainer_cls(
        optim_cfg=cfg.optim,
        callbacks=[signals],
        sink=sink,
        steps_total=cfg.train.steps,
        flops_per_token=fpt,
        peak=peak_tflops(precision, cfg.logging.peak_tflops),
        log_interval=cfg.logging.interval,
        **trainer_kw,
    )
    return train_and_finish(cfg, trainer, signals, sink, trainer_kw["processing_class"], plan)
