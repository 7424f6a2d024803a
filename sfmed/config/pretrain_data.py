"""Schema of the pretraining ``data`` group (``conf/data/pretrain_*.yaml``).

Training reads Megatron indexed datasets (``<prefix>.bin/.idx``, made by
``launch/preprocess.py``) through megatron-core's ``BlendedMegatronDatasetBuilder`` and
``GPTDataset``: either one ``prefix`` or a ``blend`` of several (``sfmed.data.blend``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sfmed.core.errors import ConfigError, Problems


def parse_split(split: str) -> tuple[float, float, float]:
    """``'99,1,0'`` (or ``'99/1/0'``, Megatron's two spellings) -> (train, valid, test).

    The one parser of ``data.split``: raises :class:`ConfigError` unless it is three
    non-negative numbers with train > 0.
    """
    parts = [p for p in str(split).replace("/", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values) or values[0] <= 0:
        raise ConfigError(
            f"data.split={split!r} must be three non-negative numbers train,valid,test "
            "with train > 0, e.g. '99,1,0'"
        )
    return values[0], values[1], values[2]


@dataclass
class PretrainDataConfig:
    """Which token streams to train on, and how they are cut into samples."""

    prefix: str | None = None
    """One indexed dataset: the path without ``.bin``/``.idx``."""

    blend: list[Any] | None = None
    """Several datasets: ``[{prefix: ..., weight: 0.3}, ...]`` or ``[{prefix: ..., tokens:
    3e8}, ...]`` (target token counts), optionally with ``group``; see ``sfmed.data.blend``."""

    groups: dict[str, Any] | None = None
    """Per-group targets for blend entries that carry only a ``group``."""

    require_metadata: bool = True
    """Blends check each output's metadata sidecar (tokenizer hash); false accepts outputs
    without one (e.g. made by Megatron-LM's preprocess_data.py)."""

    tokenizer: str | None = None
    """Tokenizer folder: checked against the blend's sidecars, and source of the EOD id."""

    eod_id: int | None = None
    """End-of-document token id (default: from the sidecar or tokenizer; only needed with
    reset_position_ids / reset_attention_mask / eod_mask_loss)."""

    seq_length: int = 4096
    split: str = "99,1,0"
    """train,valid,test proportions of each dataset's documents (Megatron's ``--split``)."""

    cache_dir: str | None = None
    """Where megatron-core caches its sample/shuffle indices (default: <run dir>/data_cache)."""

    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""

    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False

    @property
    def split_weights(self) -> tuple[float, float, float]:
        """``split`` as (train, valid, test) proportions."""
        return parse_split(self.split)

    def __post_init__(self):
        p = Problems()
        if self.prefix is not None and self.blend is not None:
            p.add(
                "data.prefix and data.blend are both set; give one (a single dataset is "
                "data.prefix=<path>, several are data.blend=[{prefix: ..., weight: ...}, ...])"
            )
        if self.seq_length < 1:
            p.add(f"data.seq_length={self.seq_length} must be >= 1")
        if self.num_workers < 0:
            p.add(f"data.num_workers={self.num_workers} must be >= 0")
        with p.collect():
            parse_split(self.split)
        if self.reset_attention_mask:
            p.add(
                "data.reset_attention_mask=true needs per-document attention masks, which the "
                "causal SDPA/flash kernels do not take; leave it false (Megatron's default)"
            )
        p.raise_if_any()
