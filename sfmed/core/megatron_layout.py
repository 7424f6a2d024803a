"""The Megatron-LM checkpoint folder layout shared by conversion and training.

```
<root>/latest_checkpointed_iteration.txt   "release" or an iteration number, written last
<root>/iter_0000100/                       torch_dist checkpoint (megatron-core dist_checkpointing)
<root>/release/                            same, for converted (not trained) weights
<root>/iter_0000100/sfmed.json             sfmed metadata: model arch, vocab padding, origin
<root>/hf/                                 HF config.json, generation config, tokenizer files
```

The tracker file is written (atomically) only after the folder it names is complete, so a
reader that follows the tracker never sees a partial checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from sfmed.core.atomic import atomic_write_text
from sfmed.core.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
META = "sfmed.json"
HF_SIDECAR = "hf"


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """No complete Megatron checkpoint where one was expected."""


def iter_dir_name(iteration: int | str) -> str:
    """``iter_0000100`` for 100; ``release`` for 'release'."""
    if iteration == RELEASE:
        return RELEASE
    return f"iter_{int(iteration):07d}"


def write_tracker(root: str | Path, iteration: int | str) -> None:
    """Mark ``iteration`` as the latest complete checkpoint under ``root`` (atomic)."""
    atomic_write_text(Path(root) / TRACKER, f"{iteration}\n")


def read_tracker(root: str | Path) -> int | str:
    """The iteration (int) or 'release' named by ``root``'s tracker file."""
    p = Path(root) / TRACKER
    if not p.is_file():
        raise CheckpointNotFoundError(
            f"{root} has no {TRACKER}: not a (complete) Megatron checkpoint folder. Point to the "
            "folder that holds the tracker file, or to an iter_*/release folder inside it."
        )
    text = p.read_text().strip()
    if text == RELEASE:
        return RELEASE
    try:
        return int(text)
    except ValueError as e:
        raise CheckpointNotFoundError(f"{p} holds {text!r}, not an iteration number") from e


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint root (with tracker) or an ``iter_*``/``release`` folder; return the latter."""
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"checkpoint path {p} does not exist")
    if (p / TRACKER).is_file():
        d = p / iter_dir_name(read_tracker(p))
        if not d.is_dir():
            raise CheckpointNotFoundError(f"{p / TRACKER} names {d.name}, which is missing")
        return d
    if (p / "metadata.json").is_file():  # megatron dist_checkpointing marker
        return p
    raise CheckpointNotFoundError(
        f"{p} is neither a checkpoint root (no {TRACKER}) nor a torch_dist checkpoint folder "
        "(no metadata.json)"
    )


def read_meta(ckpt_dir: str | Path) -> dict:
    """sfmed's metadata of a checkpoint folder ({} when absent, e.g. a Megatron-LM checkpoint)."""
    p = Path(ckpt_dir) / META
    return json.loads(p.read_text()) if p.is_file() else {}


def write_meta(ckpt_dir: str | Path, meta: dict) -> None:
    """Write sfmed's metadata into a checkpoint folder (atomic)."""
    atomic_write_text(Path(ckpt_dir) / META, json.dumps(meta, indent=2, sort_keys=True))
