"""Schema of ``launch/pipeline.py``: a recipe (its stages, their settings) and how to run it.

A recipe is a config (``conf/recipe/<name>.yaml``); a run is a folder (``out_dir``) holding
every stage's output and the ``pipeline.json`` manifest. Torch-free like every schema here;
:func:`register` stores it in Hydra's ConfigStore.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sfmed.core.errors import ConfigErrors

STAGE_KINDS = ("synthetic", "convert", "preprocess", "pretrain", "sft", "dpo", "export", "evaluate")
LAUNCHERS = ("local", "slurm")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class StageConfig:
    """One stage of a recipe: its kind, what it takes from earlier stages, its own overrides."""

    kind: str = ""
    """convert | preprocess | pretrain | sft | dpo | export | evaluate | synthetic."""

    inputs: dict[str, str] = field(default_factory=dict)
    """Role -> an earlier stage whose output fills it (e.g. ``{init_from: cpt, data: prep_sft}``;
    each kind lists its roles in docs/pipeline.md)."""

    after: list[str] = field(default_factory=list)
    """Earlier stages this one needs without taking a path from them (e.g. a blend YAML that
    names their outputs)."""

    args: list[str] = field(default_factory=list)
    """Hydra overrides of the stage's own entry point (the same ones its launch script takes)."""

    extra_args: list[str] = field(default_factory=list)
    """More overrides after ``args`` (the later value of a key wins): change one setting from
    the command line without repeating the list, e.g. "recipe.stages.sft.extra_args=['train.steps=50']"."""

    output: str | None = None
    """Where the stage writes; default ``<out_dir>/<stage name>``."""

    nproc_per_node: int = 1
    """Processes per node of a training stage (torchrun ``--nproc_per_node``)."""

    nodes: int = 1
    """Nodes of a training stage's Slurm job (local runs use one node)."""

    time: str = "04:00:00"
    """Slurm time limit of the stage's job; training jobs save and requeue before it."""


@dataclass
class CorpusBudget:
    """A corpus of the recipe and its token target (dry-run's budget table)."""

    name: str = ""
    group: str = ""
    tokens: float | None = None
    """Target tokens; None: a share of its group's target in proportion to the corpus size."""

    note: str = ""


@dataclass
class RecipeConfig:
    """A whole recipe: the stages in run order, and facts for the dry-run estimate."""

    name: str = ""
    description: str = ""
    base_model: str | None = None
    """The HF folder the recipe starts from (stages refer to it as ${recipe.base_model})."""

    stages: dict[str, StageConfig] = field(default_factory=dict)
    corpora: list[CorpusBudget] = field(default_factory=list)
    """Token targets per corpus (shown by dry_run=true; the data stages' configs apply them)."""

    token_groups: dict[str, float] = field(default_factory=dict)
    """Target tokens per corpus group (e.g. medical 1.3e9, general 1.4e9)."""

    model_params: float | None = None
    """Parameters of the trained model, for the GPU-hour estimate (6 x params x tokens)."""

    def check(self) -> list[str]:
        """Every problem of the stage graph, as messages naming the stage and the fix."""
        problems = []
        if not self.stages:
            problems.append(f"recipe {self.name!r} has no stages")
        seen: list[str] = []
        for name, st in self.stages.items():
            if not _NAME.match(name):
                problems.append(
                    f"recipe.stages.{name}: a stage name is a folder name; use letters, digits, _ . -"
                )
            if st.kind not in STAGE_KINDS:
                problems.append(
                    f"recipe.stages.{name}.kind={st.kind!r} is not one of {list(STAGE_KINDS)}"
                )
            for ref in [*(r.partition(":")[0] for r in st.inputs.values()), *st.after]:
                if ref not in seen:
                    where = "a later stage" if ref in self.stages else "not a stage of the recipe"
                    problems.append(
                        f"recipe.stages.{name} uses {ref!r}, which is {where}; a stage may use "
                        f"only the stages before it ({seen})"
                    )
            if st.nproc_per_node < 1 or st.nodes < 1:
                problems.append(f"recipe.stages.{name}: nproc_per_node and nodes must be >= 1")
            seen.append(name)
        return problems


@dataclass
class SlurmConfig:
    """``launcher=slurm``: one job per stage, chained with ``--dependency=afterok``."""

    gpus_per_node: int = 8
    """GPUs requested per node (0: a CPU job, e.g. the CPU-emulated tiny recipe)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    extra: list[str] = field(default_factory=list)
    """More sbatch options, e.g. ['--constraint=h100']."""

    logs: str | None = None
    """Job logs folder; default ``<out_dir>/logs``."""


@dataclass
class EstimateConfig:
    """Dry-run GPU-hours: 6 x params x tokens / (MFU x peak FLOP/s per GPU)."""

    mfu: float = 0.40
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM 989, A100 312)."""


@dataclass
class PipelineConfig:
    """``python launch/pipeline.py recipe=<name> [overrides]``."""

    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    out_dir: str = "outputs/pipeline"
    data_root: str = "data/raw"
    device: str = "auto"
    stages: list[str] | None = None
    """Run only these stages (their upstream stages must be complete); default all."""

    launcher: str = "local"
    dry_run: bool = False
    """Print the plan (stages, what runs or is skipped and why, token budget, GPU-hours) only."""

    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)

    def __post_init__(self):
        problems = self.recipe.check()
        if self.launcher not in LAUNCHERS:
            problems.append(f"launcher={self.launcher!r} is not one of {list(LAUNCHERS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device={self.device!r} is not one of auto, cpu, cuda")
        if self.stages is not None:
            unknown = [s for s in self.stages if s not in self.recipe.stages]
            if unknown or not self.stages:
                problems.append(
                    f"stages={list(self.stages)}: {unknown or 'empty'}; the recipe's stages are "
                    f"{list(self.recipe.stages)}"
                )
        if not 0 < self.estimate.mfu <= 1 or self.estimate.peak_tflops <= 0:
            problems.append("estimate.mfu must be in (0, 1] and estimate.peak_tflops > 0")
        if self.slurm.gpus_per_node < 0:
            problems.append(f"slurm.gpus_per_node={self.slurm.gpus_per_node} must be >= 0")
        if problems:
            raise ConfigErrors(problems)


def register() -> None:
    """Register the schema as ``pipeline_schema`` in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
