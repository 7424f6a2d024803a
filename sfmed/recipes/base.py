"""The Recipe protocol: what a training stage contributes to the shared trainer.

The trainer (:mod:`sfmed.train`: plan, build, resume, loop, checkpoint, metrics, signals, loss
guard) is the same for every stage. A recipe adds what differs between pretraining, SFT and
preference alignment:

* its **config schema** (:attr:`Recipe.config_class`, a :class:`~sfmed.config.run.RunConfig`
  subclass) and the **checkpoint kind** it writes (:attr:`Recipe.kind`);
* the **checks and resolution of its own settings** before any process group exists
  (:meth:`Recipe.resolve`: e.g. which indexed datasets, the EOD id), and the sequence length
  the model and the pipeline schedules run at (:meth:`Recipe.seq_length`);
* its **datasets and iterators** (:meth:`Recipe.build_datasets`, :meth:`Recipe.iterators`);
* any **extra frozen models** (:meth:`Recipe.extra_models`, e.g. a DPO reference, built with the
  policy's layout through ``trainer.build_frozen_model``);
* its **forward step and loss** (:meth:`Recipe.forward_step`): the loss function returns
  ``(loss_sum, token_count, report)`` as megatron-core's schedules expect with
  ``calculate_per_token_loss=True``; ``report`` maps each name of :attr:`Recipe.reports` to a
  1-D tensor of that width;
* how the **summed reports become a step's numbers** (:meth:`Recipe.summarize`): the loss that
  is optimised and guarded, the tokens that count for throughput/MFU, and any extra metrics.

The loop sums every report over micro-batches and data-parallel ranks (as float64) and hands the
totals to :meth:`Recipe.summarize`; it never names a metric itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from sfmed.core.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from sfmed.config.run import RunConfig
    from sfmed.train.plan import TrainPlan


@dataclass
class StepReport:
    """A step's (or a validation pass's) numbers, as every rank agrees on them."""

    loss: float
    """The optimised loss (what the loss guard checks and the log shows as ``loss``)."""
    loss_tokens: float
    """Tokens the loss is averaged over (logged as ``tokens``)."""
    tokens: float
    """Tokens processed, for throughput and MFU (e.g. every position of every sequence)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Further numbers to log under their names (e.g. DPO's reward margins)."""


class Recipe:
    """Base of a training stage (see the module docstring). Subclass it; override as needed."""

    kind: ClassVar[str]
    """Checkpoint ``origin.kind`` this recipe writes (``pretrain``, ``sft``, ...)."""
    config_class: ClassVar[type]
    """The run-config schema (a ``RunConfig`` subclass) the recipe reads."""
    reports: ClassVar[dict[str, int]]
    """Name -> width of every tensor the loss function reports (summed over the global batch)."""
    seq_length_setting: ClassVar[str] = "data.seq_length"
    """The config key of :meth:`seq_length` (error messages name it)."""
    resumable_kinds: ClassVar[tuple[str, ...]] = ()
    """Checkpoint kinds besides :attr:`kind` whose full training state this recipe can resume."""

    def __init__(self, cfg: RunConfig):
        if not isinstance(cfg, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                f"{type(cfg).__name__}"
            )
        self.cfg = cfg

    # -- before any process group (raise ConfigError for what cannot work) ----------------------

    def seq_length(self) -> int:
        """Tokens per sequence: the model's and the pipeline schedules' sequence length."""
        raise NotImplementedError

    def schedule_shape(self, plan: TrainPlan) -> tuple[int, int]:
        """(sequence length, micro-batch size) of the activations pipeline stages exchange:
        ``(plan.seq_length, train.micro_batch_size)`` unless the forward step reshapes the batch."""
        return plan.seq_length, self.cfg.train.micro_batch_size

    def resolve(self, plan: TrainPlan) -> Any:
        """Check this stage's own settings against the plan; return what the build needs
        (stored as ``plan.recipe``). Reads only small files."""
        return None

    def check_resume(self, meta: dict, where: Any) -> None:
        """Refuse to resume the training state of a checkpoint written by another stage."""
        kind = (meta.get("origin") or {}).get("kind")
        if kind is not None and kind not in (self.kind, *self.resumable_kinds):
            raise ConfigError(
                f"resume={where} is a {kind!r} checkpoint; a {self.kind} run resumes only its "
                f"own kind. Start from its weights instead: init_from={where} (and resume=never "
                "or a new ckpt_dir)"
            )

    def describe(self, plan: TrainPlan) -> str:
        """A short summary of the recipe's resolution for the run's first log line."""
        return self.kind

    # -- after the process groups and the model exist ---------------------------------------------

    def build_datasets(self, plan: TrainPlan) -> tuple[Any, Any]:
        """(train, valid) datasets sized for the whole run; valid may be None. All ranks call it."""
        raise NotImplementedError

    def iterators(
        self, dataset, consumed: int, plan: TrainPlan, model: list, total: int | None = None
    ) -> list:
        """One batch iterator per model chunk (``None`` where a chunk reads no data): samples
        ``consumed .. total`` of ``dataset`` (``total`` None: to its end), global batch by global
        batch, this data-parallel rank's share (Megatron-LM's pretraining sampler)."""
        from sfmed.train.data import chunk_iterators

        return chunk_iterators(
            dataset, consumed, self.cfg, plan, model, total=total, num_workers=self.num_workers()
        )

    def num_workers(self) -> int:
        """DataLoader worker processes per rank (0: load in the training process)."""
        return 0

    def extra_models(self, trainer) -> dict[str, list]:
        """Frozen models besides the trained one (e.g. a reference), by name. Built once, after
        the trained model, with ``trainer.build_frozen_model(ckpt)``; not checkpointed."""
        return {}

    def prepare_step(self, trainer, data_iterators: list) -> None:
        """Called on every rank before each step's (and each validation batch's) schedule, with
        the iterators it will read: e.g. to score the step's micro-batches with a frozen model
        in a forward-only pass of its own (collectives allowed: every rank calls it)."""

    def forward_step(self, trainer) -> Callable:
        """``forward_step(data_iterator, model_chunk)`` for megatron-core's schedules."""
        raise NotImplementedError

    def summarize(self, totals: dict[str, list[float]]) -> StepReport:
        """The step's numbers from the reports summed over the global batch."""
        raise NotImplementedError

    # -- state beyond model/optimizer/data position -------------------------------------------------

    def state_dict(self) -> dict:
        """Recipe state saved in every checkpoint's ``train_state``."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""

    def metadata(self) -> dict:
        """Extra fields of the checkpoint's ``sfmed.json`` ``origin`` (JSON-able)."""
        return {}
