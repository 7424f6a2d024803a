"""``launch/pipeline.py``'s work: plan, check every stage's config, then run or print."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sfmed.config.pipeline import PipelineConfig
from sfmed.core.errors import ConfigErrors
from sfmed.pipeline.estimate import budget_lines, compute_lines
from sfmed.pipeline.manifest import Manifest
from sfmed.pipeline.plan import Plan, PlannedStage, make_plan
from sfmed.pipeline.report import write_summary
from sfmed.pipeline.runner import StageFailed, reconcile, run_local, run_slurm

# compose(config_name, overrides) -> the composed DictConfig (Hydra lives in the entry point)
Compose = Callable[[str, list[str]], Any]


def _schema(ps: PlannedStage) -> type:
    module, name = ps.kind.schema.split(":")
    mod = importlib.import_module(module)
    mod.register()
    return getattr(mod, name)


def check_stage_configs(plan: Plan, compose: Compose) -> dict[str, Any]:
    """Compose and validate the config of every stage that runs, as its entry point will;
    every problem at once, before any stage starts. Returns the typed configs by stage."""
    from sfmed.config.validate import build_config, validate_run_config

    problems, typed = [], {}
    for ps in plan.stages:
        if ps.kind.config_name is None:
            continue
        try:
            schema = _schema(ps)
            dcfg = compose(ps.kind.config_name, ps.args)
            if ps.kind.training:
                world = ps.cfg.nproc_per_node * ps.cfg.nodes
                typed[ps.name] = validate_run_config(dcfg, schema, world_size=world)
            else:
                typed[ps.name] = build_config(dcfg)
        except ConfigErrors as e:
            if ps.runs:
                problems += [f"stage {ps.name}: {p}" for p in e.problems]
        except Exception as e:
            if ps.runs:
                problems.append(f"stage {ps.name}: {str(e).strip().splitlines()[0]}")
    if problems:
        raise ConfigErrors(problems)
    return typed


def _stage_tokens(plan: Plan, typed: dict[str, Any]) -> dict[str, tuple[str, float | None]]:
    out = {}
    for ps in plan.stages:
        if not ps.kind.training:
            continue
        conf = typed.get(ps.name)
        seq = getattr(getattr(conf, "data", None), "seq_length", None)
        train = getattr(conf, "train", None)
        tokens = None
        if seq and train is not None:
            tokens = float(train.steps * train.global_batch_size * seq)
        out[ps.name] = (ps.kind.kind, tokens)
    return out


def run_pipeline(cfg: PipelineConfig, argv: list[str], compose: Compose, echo=print) -> int:
    """Plan, check, then run (or print the plan with ``dry_run``); returns the exit code."""
    # Relative folders mean the user's working directory, wherever the stages run (Slurm jobs
    # start in the submit directory); the manifest records absolute paths.
    cfg.out_dir = str(Path(cfg.out_dir).absolute())
    cfg.data_root = str(Path(cfg.data_root).absolute())
    out_dir = Path(cfg.out_dir)
    manifest = Manifest(out_dir, cfg.recipe.name)
    plan = make_plan(cfg, manifest)
    typed = check_stage_configs(plan, compose)
    where = "as a Slurm job chain" if cfg.launcher == "slurm" else "locally"
    echo(f"pipeline {cfg.recipe.name} in {out_dir} ({where}):")
    for line in plan.lines():
        echo(line)
    if cfg.dry_run:
        for line in [*budget_lines(cfg), *compute_lines(cfg, _stage_tokens(plan, typed))]:
            echo(line)
        echo("dry run: nothing was run")
        return 0
    reconcile(plan, manifest)
    if cfg.launcher == "slurm":
        run_slurm(plan, manifest, cfg, argv, echo=echo)
        return 0
    try:
        run_local(plan, manifest, out_dir, echo=echo)
    except StageFailed as e:
        echo(f"pipeline: {e}")
        write_summary(plan, manifest, out_dir)
        return e.code
    summary = write_summary(plan, manifest, out_dir)
    echo(summary.read_text(encoding="utf-8"))
    echo(f"pipeline {cfg.recipe.name}: complete; summary {summary}, manifest {manifest.path}")
    return 0
