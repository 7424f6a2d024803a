"""Schema of ``launch/pretrain.py``: the shared run config plus the pretraining ``data`` group.

YAML under ``conf/`` only sets values. :func:`register` stores the schema in Hydra's ConfigStore
(Hydra is imported lazily, so library code and tests use these dataclasses without it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sfmed.config.pretrain_data import PretrainDataConfig
from sfmed.config.run import DEVICES, RunConfig

__all__ = ["DEVICES", "PretrainConfig", "register"]


@dataclass
class PretrainConfig(RunConfig):
    """Continued pretraining (next-token prediction on indexed datasets) on megatron-core."""

    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    run_name: str = "pretrain"


def register() -> None:
    """Register the schema as ``pretrain_schema`` in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)
