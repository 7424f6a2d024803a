"""The stage registry: one module per stage kind, each registering a :class:`StageKind`."""

from __future__ import annotations

import importlib

from sfmed.pipeline.stages.base import StageKind

STAGE_MODULES = {
    "synthetic": "sfmed.pipeline.stages.synthetic",
    "convert": "sfmed.pipeline.stages.convert",
    "preprocess": "sfmed.pipeline.stages.preprocess",
    "pretrain": "sfmed.pipeline.stages.training",
    "sft": "sfmed.pipeline.stages.training",
    "dpo": "sfmed.pipeline.stages.training",
    "export": "sfmed.pipeline.stages.export",
    "evaluate": "sfmed.pipeline.stages.evaluate",
}
_REGISTRY: dict[str, StageKind] = {}


def register_stage(kind: StageKind) -> StageKind:
    """Add ``kind`` to the registry (each stage module calls this for its kinds)."""
    _REGISTRY[kind.kind] = kind
    return kind


def get_stage(kind: str) -> StageKind:
    """The registered stage kind ``kind`` (its module is imported on first use)."""
    if kind not in _REGISTRY and kind in STAGE_MODULES:
        importlib.import_module(STAGE_MODULES[kind])
    if kind not in _REGISTRY:
        raise KeyError(f"no stage kind {kind!r}; known: {sorted(STAGE_MODULES)}")
    return _REGISTRY[kind]
