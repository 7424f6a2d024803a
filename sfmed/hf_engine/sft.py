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

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sfmed.hf_engine.common import (
    EngineTrainerMixin,
    MegatronSchedule,
    check_engine,
    device_and_precision,
    export,
    load_model,
    lora_config,
    param_groups,
    train_rows,
    training_args,
)

if TYPE_CHECKING:
    from sfmed.config.sft import SFTConfig

log = logging.getLogger(__name__)


def _check(cfg: SFTConfig) -> dict:
    """Every check that can fail, before a model or dataset is loaded; returns the plan."""
    plan = check_engine(cfg, validation=True)
    # The sharded engine's data resolution: every dataset checked against its sidecar (kind,
    # sequence length, mask mode, packing, the tokenizer's vocabulary against the model's).
    from sfmed.recipes.sft import resolve_data

    plan["data"] = resolve_data(cfg, vocab_size=plan["vocab_size"])
    return plan


# --------------------------------------------------------------------------- the trainer
def _trainer_class():
    import torch
    from trl import SFTTrainer

    class SFMedSFTTrainer(EngineTrainerMixin, SFTTrainer):
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
            eval_capacity=0,
            log_interval=1,
            **kw,
        ):
            self._optim_cfg = optim_cfg
            self._steps_total = steps_total
            super().__init__(*a, **kw)
            self._capacity = capacity  # samples x seq_length of a global batch
            self._eval_capacity = eval_capacity  # samples x seq_length of a validation pass
            self._sink, self._log_interval = sink, log_interval
            self._fpt, self._peak = flops_per_token, peak
            self._acc = torch.zeros(3, dtype=torch.float64)  # loss, supervised, tokens
            self._t_last = time.perf_counter()

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
                dt = self._step_clock()
                if isinstance(grad_norm, torch.Tensor):
                    grad_norm = grad_norm.item()
                r = {
                    "step": step,
                    "steps": self._steps_total,
                    "loss": loss,
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "lr": self._step_lr(kw),
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

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            """A validation pass as the sharded engine's: the loss summed over every
            supervised token of the validation samples on all ranks, divided by their number
            (transformers' own loop averages per-batch means); logged as ``valid_loss``."""
            model = self.model
            was_training = model.training
            model.eval()
            acc = torch.zeros(3, dtype=torch.float64, device=self.args.device)
            with torch.no_grad():
                for batch in self.get_eval_dataloader(eval_dataset):
                    batch = self._prepare_inputs(batch)
                    n = (batch["labels"][..., 1:] != -100).sum()
                    with self.compute_loss_context_manager():
                        loss = self.compute_loss(model, batch)  # mean over the batch's targets
                    acc += torch.stack(
                        [loss.detach().double() * n, n.double(), torch.tensor(
                            float(batch["input_ids"].numel()), device=acc.device)]
                    )  # fmt: skip
            model.train(was_training)
            if self.accelerator.num_processes > 1:
                acc = self.accelerator.reduce(acc, reduction="sum")
            acc = acc.cpu()
            loss = float(acc[0] / acc[1].clamp(min=1))
            capacity = self._eval_capacity or 1
            metrics = {f"{metric_key_prefix}_loss": loss}
            if self._sink is not None and self._sink.enabled:
                step = self.state.global_step
                self._sink.log(
                    {
                        "step": step,
                        "valid_loss": loss,
                        "valid_real_tokens": float(acc[2]),
                        "valid_packing_efficiency": float(acc[2]) / capacity,
                        "valid_supervised_fraction": float(acc[1]) / capacity,
                    },
                    f"step {step} | valid loss {loss:.4f}",
                )
            self.control = self.callback_handler.on_evaluate(
                self.args, self.state, self.control, metrics
            )
            return metrics

    return SFMedSFTTrainer


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


# --------------------------------------------------------------------------- entry
def run(cfg: SFTConfig) -> str:
    """Train ``cfg.hf.model`` on ``cfg.data`` with TRL's SFTTrainer; return the run status
    (``complete`` | ``interrupted`` | ``failed``)."""
    plan = _check(cfg)
    from transformers import AutoTokenizer
    from trl import SFTConfig as TRLConfig

    from sfmed.hf_engine.data import ordered_rows

    t, h = cfg.train, cfg.hf
    run_dir: Path = plan["run_dir"]
    cuda, precision = device_and_precision(cfg)

    # Data: the sharded engine's training samples in its seeded order: step k reads samples
    # [k * global_batch, (k + 1) * global_batch), the same in both engines.
    from sfmed.recipes.sft import SFTSamples, split_parts

    data = plan["data"]
    parts, valid_parts = split_parts(data, cfg.data.split_weights, t.seed)
    samples = SFTSamples(data, parts, t.steps * t.global_batch_size, t.seed)
    rows = ordered_rows(samples, run_dir / "data_cache")
    # Validation: the sharded engine's samples (train.eval_iters global batches, seed + 1).
    eval_rows, eval_size = None, t.eval_iters * t.global_batch_size
    if t.eval_interval and all(len(p) for p in valid_parts):
        valid = SFTSamples(data, valid_parts, eval_size, t.seed + 1)
        eval_rows = ordered_rows(valid, run_dir / "data_cache")
    elif t.eval_interval:
        log.warning("a dataset has no validation samples at data.split=%s", cfg.data.split)

    tokenizer = AutoTokenizer.from_pretrained(h.model)
    if tokenizer.pad_token is None:
        # Rows are not padded (padding-free); TRL's collator still wants a pad token.
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(data.pad_id))
    model = load_model(cfg)
    if h.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(h.lora))

    targs = training_args(cfg, plan, cuda, precision)
    if eval_rows is None:
        targs.update(eval_strategy="no", eval_steps=None)
    args = TRLConfig(
        **targs,
        padding_free=True,
        max_length=None,
        shuffle_dataset=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        average_tokens_across_devices=True,
    )
    return train_rows(
        cfg, plan, _trainer_class(), precision, model=model, args=args, train_dataset=rows,
        processing_class=tokenizer, capacity=t.global_batch_size * data.seq_length,
        eval_dataset=eval_rows, eval_capacity=eval_size * data.seq_length,
    )  # fmt: skip


__all__ = ["MegatronSchedule", "export", "param_groups", "run"]
