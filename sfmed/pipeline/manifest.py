"""``pipeline.json``: what each stage ran with, what it produced, and how it ended.

Per stage: ``kind``, ``key`` (hash of its config, its upstream stages' keys and its external
inputs' fingerprints), ``config`` (the overrides, processes, nodes), ``inputs`` (role -> stage,
path, key), ``external`` (path -> fingerprint), ``output``, ``status`` (running, submitted,
complete, failed, interrupted), ``started``/``finished``/``seconds``, ``attempts``, ``result``
(final numbers) and ``job_id`` on Slurm. Rewritten atomically after every change.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from sfmed.core.atomic import atomic_write_text
from sfmed.core.errors import UserError

MANIFEST = "pipeline.json"
FORMAT = 1


def sfmed_version() -> str:
    """The installed sfmed version (``unknown`` when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sfmed")
    except PackageNotFoundError:
        return "unknown"


def now() -> str:
    """UTC time as ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fingerprint(path: str | Path) -> str:
    """A cheap identity of a file or folder: sizes and modification times of every file under
    it (contents are not read: a 7B model or a raw corpus would take minutes to hash)."""
    p = Path(path)
    entries = []
    if p.is_file():
        st = p.stat()
        entries.append(("", st.st_size, st.st_mtime_ns))
    else:
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for f in sorted(files):
                fp = Path(root) / f
                st = fp.stat()
                entries.append((str(fp.relative_to(p)), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def stage_key(doc: dict) -> str:
    """The hash that says "same stage": over its config, upstream keys and external inputs."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


class Manifest:
    """``<out_dir>/pipeline.json``, loaded at start and saved after each change."""

    def __init__(self, out_dir: str | Path, recipe: str):
        self.path = Path(out_dir) / MANIFEST
        self.data = {"format": FORMAT, "recipe": recipe, "stages": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise UserError(
                    f"{self.path} is not valid JSON ({e}); it was not written by sfmed (its "
                    "writes are atomic): restore it or remove the pipeline folder to start over"
                ) from None
            if self.data.get("recipe") != recipe:
                raise UserError(
                    f"{self.path.parent} holds a run of recipe {self.data.get('recipe')!r}, not "
                    f"{recipe!r}; choose another out_dir=..."
                )

    @property
    def stages(self) -> dict[str, dict]:
        """Stage name -> record."""
        return self.data.setdefault("stages", {})

    def update(self, name: str, **fields) -> dict:
        """Merge ``fields`` into the stage's record and save."""
        rec = self.stages.setdefault(name, {})
        rec.update(fields)
        self.save()
        return rec

    def save(self) -> None:
        """Write the manifest atomically (with the sfmed version and the time)."""
        self.data["sfmed_version"] = sfmed_version()
        self.data["updated"] = now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=1, ensure_ascii=False) + "\n")
