"""Validate a composed run config completely, before torch or megatron-core is imported.

A training entry point turns Hydra's composed config into its typed schema here: every group is
validated on its own so that **all** problems are reported together
(:class:`~sfmed.core.errors.ConfigErrors`), then the checks that need only the world size
(parallel sizes against the processes and the model's heads, batch divisibility, warmup) run on
the result. Torch-free: under torchrun every rank gets its answer within seconds instead of
after importing megatron-core; the trainer's plan repeats these checks with the full picture.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from sfmed.core.errors import ConfigError, ConfigErrors, config_problems
from sfmed.core.parallel import validate_parallel, validate_parallel_sizes


def _subgroups(node: Any) -> dict[str, Any]:
    """The fields of ``node`` that are themselves structured configs (dataclass nodes)."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, DictConfig) or not dataclasses.is_dataclass(OmegaConf.get_type(node)):
        return {}
    out = {}
    for f in dataclasses.fields(OmegaConf.get_type(node)):
        sub = node.get(f.name)
        if isinstance(sub, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(sub)):
            out[f.name] = sub
    return out


def _build(node: Any) -> tuple[Any, list[str]]:
    """``node`` as its dataclass (None when invalid) and all of its problems.

    OmegaConf builds the nested configs first, so a bad nested value (``logging.wandb.mode``)
    would hide the group's own problems (``logging.interval``): on failure each nested config is
    built on its own, and the group once more with the bad ones at their defaults."""
    obj, problems, _ = _build_typed(node)
    return obj, problems


def _build_typed(node: Any) -> tuple[Any, list[str], type[ConfigErrors]]:
    """:func:`_build`, plus the error type the schema raises (``ConfigErrors`` or a subclass)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_object(node), [], ConfigErrors
    except ConfigError as e:
        first = config_problems(e)
        kind = type(e) if isinstance(e, ConfigErrors) else ConfigErrors
    problems: list[str] = []
    bad = []
    for name, sub in _subgroups(node).items():
        _, sub_problems = _build(sub)
        if sub_problems:
            bad.append(name)
            problems += sub_problems
    if not bad:
        return None, first, kind
    rest = node.copy()
    for name in bad:
        rest[name] = OmegaConf.structured(OmegaConf.get_type(node[name]))
    try:
        OmegaConf.to_object(rest)
    except ConfigError as e:
        problems += config_problems(e)
    return None, list(dict.fromkeys(problems)), kind


def build_config(cfg: Any) -> Any:
    """A composed config as its typed schema (``OmegaConf.to_object``), or the schema's
    :class:`ConfigErrors` with the problems of every nested config and of the config itself --
    not only the first one OmegaConf meets. For the entries whose checks need no world size."""
    obj, problems, kind = _build_typed(cfg)
    if problems:
        raise kind(problems)
    return obj


def _groups(cfg: Any, schema: type) -> tuple[dict[str, Any], list[str]]:
    """Each group of ``cfg`` as its dataclass (None where invalid), and every group's problems."""
    from omegaconf import DictConfig, OmegaConf

    groups: dict[str, Any] = {}
    problems: list[str] = []
    for f in dataclasses.fields(schema):
        node = cfg.get(f.name) if isinstance(cfg, DictConfig) else None
        if isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node)):
            groups[f.name], group_problems = _build(node)
            problems += group_problems
    return groups, problems


def _starts_from_checkpoint(conf: Any) -> bool:
    """Whether the run will load a checkpoint (whose architecture ``model=auto`` takes)."""
    from pathlib import Path

    from sfmed.core.megatron_layout import TRACKER

    if conf.init_from or conf.resume not in ("auto", "never"):
        return True
    ckpt_dir = getattr(conf, "ckpt_dir", None)
    return conf.resume == "auto" and bool(ckpt_dir) and (Path(ckpt_dir) / TRACKER).is_file()


def world_size_problems(conf: Any, world_size: int | None = None) -> list[str]:
    """What cannot work with ``world_size`` processes (default ``$WORLD_SIZE``), from the config
    alone: parallel sizes, the preset model's heads/layers, batch sizes, warmup. Groups that are
    ``None`` on ``conf`` (invalid on their own) are left out."""
    world = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", "1"))
    p, t, m, o = (getattr(conf, g, None) for g in ("parallel", "train", "model", "optim"))
    problems: list[str] = []

    def check(fn, *args):
        try:
            return fn(*args)
        except ConfigError as e:
            problems.extend(config_problems(e))
            return None

    dp = check(validate_parallel_sizes, world, p.tp, p.pp, p.cp) if p else None
    # A preset's shape is known here; one read from a checkpoint or HF config is checked later.
    from_ckpt = m is not None and m.from_checkpoint and _starts_from_checkpoint(conf)
    if p and m and not m.hf_config and not from_ckpt:
        check(validate_parallel, m, p.tp, p.pp)
    if t and dp and t.global_batch_size % (t.micro_batch_size * dp):
        problems.append(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"micro_batch_size × data-parallel size = {t.micro_batch_size} × {dp} = "
            f"{t.micro_batch_size * dp}; use a multiple of {t.micro_batch_size * dp}"
        )
    if t and o:
        decay = o.decay_steps or t.steps
        warmup = o.resolve_warmup(decay)
        if warmup >= decay:
            problems.append(
                f"optim.warmup_steps={warmup} must be smaller than the decay horizon "
                f"optim.decay_steps={decay} (default: train.steps); lower it, or unset it "
                "(optim.warmup_steps=null) to warm up over optim.warmup_fraction of the run"
            )
    return problems


def validate_run_config(cfg: Any, schema: type, world_size: int | None = None) -> Any:
    """The typed config, or :class:`ConfigErrors` with every problem found without torch: each
    group's own, and what the groups together cannot do with ``world_size`` processes."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    groups, problems = _groups(cfg, schema)
    if problems:
        view = SimpleNamespace(
            **groups,
            init_from=cfg.get("init_from"),
            resume=cfg.get("resume"),
            ckpt_dir=cfg.get("ckpt_dir"),
        )
        raise ConfigErrors(problems + world_size_problems(view, world_size))
    try:
        conf = OmegaConf.to_object(cfg)
    except ConfigError as e:
        raise ConfigErrors(config_problems(e)) from None
    problems = world_size_problems(conf, world_size)
    if problems:
        raise ConfigErrors(problems)
    return conf
