"""DPO with TRL's ``DPOTrainer`` on a Hugging Face folder (``launch/dpo.py engine=hf``).

What it shares with the sharded engine (:mod:`sfmed.recipes.dpo`), so that the two agree step
by step (the parity gate):

* the data: the pair datasets of ``launch/preprocess.py format=preference`` (prompt shared,
  each side supervised only on its own answer and ``<|im_end|>``), resolved, split and ordered
  by the sharded engine's own code, given to TRL already tokenized (``prompt_ids``,
  ``chosen_ids``, ``rejected_ids``; :func:`sfmed.hf_engine.data.pair_row`): TRL's prompt
  extraction and chat-template tokenization are skipped, so both engines score the same
  tokens. One pair per sample: packed pair data is the sharded engine's;
* the loss: TRL's own (``loss_type`` sigmoid | ipo | hinge | robust, ``beta``,
  ``label_smoothing`` for robust; ``rpo_alpha`` as TRL 1.x's ``["<loss>", "sft"]`` with weights
  ``[1, α]``), the mean over the pairs of a step (every micro-batch holds the same number of
  pairs, so TRL's per-micro-batch mean averaged over gradient accumulation is that mean).
  :mod:`sfmed.recipes.dpo_loss` states where TRL 1.x differs from the papers; what TRL 1.x
  cannot do (conservative DPO, reference-free) is refused before work;
* the reference: ``hf.model`` itself, frozen. With LoRA it is the policy with the adapter
  disabled (no second copy); full-parameter runs load a second frozen copy
  (``reference.mode=on_the_fly``) or score every pair once before the first step
  (``reference.mode=precompute``, TRL's ``precompute_ref_log_probs``; cached beside the run);
* the optimizer, LR schedule, exit signals, checkpoints, resume, ``status.json`` and export of
  the SFT HF engine (:mod:`sfmed.hf_engine.common`);
* the record: ``metrics.jsonl`` with ``loss``, ``grad_norm``, ``lr``, ``pairs``, ``tokens``
  (supervised answer tokens of the global batch), ``rewards/chosen``, ``rewards/rejected``,
  ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` (TRL's
  definitions: means over the step's pairs) and throughput.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from sfmed.core.errors import ConfigError, UserError
from sfmed.hf_engine.common import (
    EngineTrainerMixin,
    check_engine,
    device_and_precision,
    load_model,
    lora_config,
    train_rows,
    training_args,
)

if TYPE_CHECKING:
    from sfmed.config.dpo import DPOConfig

PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


# --------------------------------------------------------------------------- checks before work
def trl_loss(cfg: DPOConfig) -> dict:
    """``trl.DPOConfig`` fields of ``cfg.dpo``; raises ``ConfigError`` for what TRL 1.x's
    ``DPOTrainer`` does not implement."""
    d = cfg.dpo
    if d.reference_free:
        raise ConfigError(
            "dpo.reference_free=true: TRL 1.x's DPOTrainer has no reference-free mode; use "
            "engine=mcore, or dpo.reference_free=false"
        )
    if d.loss_type == "sigmoid" and d.label_smoothing:
        raise ConfigError(
            f"dpo.label_smoothing={d.label_smoothing} with dpo.loss_type=sigmoid (conservative "
            "DPO): TRL 1.x applies label smoothing only to robust; use engine=mcore, "
            "dpo.loss_type=robust, or dpo.label_smoothing=0"
        )
    out = {"beta": float(d.beta), "label_smoothing": float(d.label_smoothing)}
    if d.rpo_alpha is None:
        out["loss_type"] = [d.loss_type]
    else:
        # RPO in TRL 1.x: the preference loss plus α × the chosen answers' per-token NLL.
        out["loss_type"] = [d.loss_type, "sft"]
        out["loss_weights"] = [1.0, float(d.rpo_alpha)]
    return out


def _check(cfg: DPOConfig) -> dict:
    """Every check that can fail, before a model or dataset is loaded; returns the plan."""
    plan = check_engine(cfg)
    plan["trl_loss"] = trl_loss(cfg)
    if cfg.reference.checkpoint:
        raise ConfigError(
            f"reference.checkpoint={cfg.reference.checkpoint!r} is a Megatron checkpoint of the "
            "sharded engine; with engine=hf the reference is hf.model itself (with LoRA: the "
            "adapter disabled); drop reference.checkpoint"
        )
    # The sharded engine's data resolution: every dataset checked against its sidecar (kind,
    # sequence length, packing, the tokenizer's vocabulary against the model's).
    from sfmed.data.chat.store import complete_meta
    from sfmed.recipes.dpo import KIND, _packed
    from sfmed.recipes.sft import resolve_data

    data = resolve_data(cfg, vocab_size=plan["vocab_size"], kind=KIND)
    packed = [p for p in data.prefixes if _packed(complete_meta(p))]
    if packed:
        raise ConfigError(
            f"{', '.join(packed)}: packed pair data (chat.pack=true); engine=hf trains one pair "
            "per sample (TRL's DPOTrainer): preprocess with chat.pack=false, or use engine=mcore"
        )
    plan["data"] = data
    return plan


# --------------------------------------------------------------------------- the trainer
def _trainer_class():
    import torch
    from trl import DPOTrainer

    from sfmed.hf_engine.data import PAIR_FEATURES

    class SFMedDPOTrainer(EngineTrainerMixin, DPOTrainer):
        """TRL's DPOTrainer on pre-tokenized pairs in the order given, writing sfmed's
        per-step records."""

        def __init__(
            self,
            *a,
            optim_cfg=None,
            sink=None,
            steps_total=0,
            flops_per_token=None,
            peak=None,
            log_interval=1,
            **kw,
        ):
            self._optim_cfg = optim_cfg
            self._steps_total = steps_total
            super().__init__(*a, **kw)
            self._sink, self._log_interval = sink, log_interval
            self._fpt, self._peak = flops_per_token, peak
            # loss, pairs, supervised answer tokens, real tokens (both sides, prompt included)
            self._acc = torch.zeros(4, dtype=torch.float64)
            self._marks: dict[str, int] = {}
            self._t_last = time.perf_counter()

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # The rows are sfmed's encoding already; TRL's prompt extraction and tokenization
            # would re-encode text the rows do not carry.
            missing = [k for k in PAIR_FEATURES if k not in dataset.column_names]
            if missing:
                raise ValueError(f"{dataset_name} rows lack {missing} (see pair_row)")
            return dataset

        def training_step(self, model, inputs, num_items_in_batch=None):
            m = inputs["completion_mask"]
            counts = [m.shape[0] // 2, int(m[:, 1:].sum()), int(inputs["attention_mask"].sum())]
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._acc += torch.tensor([loss.item(), *counts], dtype=torch.float64)
            return loss

        def _step_pair_metrics(self) -> dict[str, float]:
            # TRL appends one value per micro-batch (already gathered over processes); every
            # micro-batch holds the same number of pairs, so their mean is the step's mean.
            out = {}
            for k in PAIR_METRICS:
                vals = self._metrics["train"].get(k, [])[self._marks.get(k, 0) :]
                out[k] = sum(vals) / len(vals) if vals else None
            return out

        def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *a, **kw):
            acc = self._acc.clone().to(self.args.device)
            if self.accelerator.num_processes > 1:
                acc = self.accelerator.reduce(acc, reduction="sum")
            acc = acc.cpu()
            # Each process's loss is its share of the global mean (transformers divides by the
            # accumulation steps, DDP averages over processes).
            loss = float(acc[0]) / self.accelerator.num_processes
            self._acc.zero_()
            pair = self._step_pair_metrics()
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
                    "pairs": int(acc[1]),
                    "tokens": int(acc[2]),
                    "real_tokens": int(acc[3]),
                    **pair,
                    "step_time_s": dt,
                    "tokens_per_s": float(acc[3]) / dt,
                    "loss_tokens_per_s": float(acc[2]) / dt,
                }
                if self._fpt:
                    # the policy's training FLOPs (forward + backward) only
                    tf = self._fpt * float(acc[3]) / dt / self.accelerator.num_processes / 1e12
                    r["tflops_per_gpu"] = tf
                    r["mfu"] = tf / self._peak if self._peak else None
                if step % self._log_interval == 0 or step == self._steps_total:
                    self._sink.log(r, console=_console(r))
            out = super()._maybe_log_save_evaluate(tr_loss, grad_norm, *a, **kw)
            # TRL's log() empties its lists when it logs; start the next step after what is left.
            self._marks = {k: len(v) for k, v in self._metrics["train"].items()}
            return out

    return SFMedDPOTrainer


def _console(r: dict) -> str:
    parts = [
        f"step {r['step']}/{r['steps']}",
        f"loss {r['loss']:.4f}",
        f"margin {r['rewards/margins']:.4f}" if r["rewards/margins"] is not None else "",
        f"acc {r['rewards/accuracies']:.2f}" if r["rewards/accuracies"] is not None else "",
        f"lr {r['lr']:.3e}",
        "grad_norm -" if r["grad_norm"] is None else f"grad_norm {r['grad_norm']:.3f}",
        f"{r['pairs']} pairs",
        f"{r['tokens_per_s']:,.0f} tok/s",
    ]
    return " | ".join(p for p in parts if p)


# --------------------------------------------------------------------------- entry
def run(cfg: DPOConfig) -> str:
    """Train ``cfg.hf.model`` on ``cfg.data`` with TRL's DPOTrainer; return the run status
    (``complete`` | ``interrupted`` | ``failed``)."""
    plan = _check(cfg)
    from transformers import AutoTokenizer
    from trl import DPOConfig as TRLConfig

    from sfmed.hf_engine.data import ordered_pair_rows
    from sfmed.recipes.dpo import PreferenceSamples
    from sfmed.recipes.sft import split_parts

    t, h = cfg.train, cfg.hf
    run_dir: Path = plan["run_dir"]
    cuda, precision = device_and_precision(cfg)

    # Data: the sharded engine's training samples in its seeded order: step k reads samples
    # [k * global_batch, (k + 1) * global_batch), the same in both engines.
    data = plan["data"]
    parts, _ = split_parts(data, cfg.data.split_weights, t.seed)
    gbs = t.global_batch_size
    samples = PreferenceSamples(data, parts, t.steps * gbs, t.seed, gbs)
    try:
        rows = ordered_pair_rows(samples, run_dir / "data_cache")
    except ValueError as e:
        raise UserError(f"{', '.join(data.prefixes)}: {e}") from e

    tokenizer = AutoTokenizer.from_pretrained(h.model)
    if tokenizer.pad_token is None:
        # Padding is masked out of attention and scores; TRL's collator needs some id.
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(data.pad_id))
    model = load_model(cfg)
    args = TRLConfig(
        **training_args(cfg, plan, cuda, precision),
        **plan["trl_loss"],
        max_length=None,  # the data is already cut to seq_length at preprocessing
        precompute_ref_log_probs=cfg.reference.mode == "precompute",
        # The step-0 gate (loss = ln 2 with policy = reference) needs dropout off; TRL's default.
        disable_dropout=True,
        pad_to_multiple_of=None,
    )
    return train_rows(
        cfg, plan, _trainer_class(), precision, model=model, args=args, train_dataset=rows,
        processing_class=tokenizer, peft_config=lora_config(h.lora) if h.lora.enabled else None,
    )  # fmt: skip


__all__ = ["PAIR_METRICS", "run", "trl_loss"]
