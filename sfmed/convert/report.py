"""Progress bar and the one-line summary of a conversion."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class ConversionSummary:
    """What a conversion did: printed by the entry point, returned to callers and tests."""

    direction: str
    src: str
    dst: str
    tensors: int
    bytes: int
    seconds: float
    files: int
    dtype: str = ""
    """The dtype of the written weights."""

    def line(self) -> str:
        """``hf->mcore: 339 tensors (bfloat16), 15.23 GB in 512.3 s (29.7 MB/s), 4 data files ->
        dst``."""
        rate = self.bytes / max(self.seconds, 1e-9) / 1e6
        dt = f" ({self.dtype})" if self.dtype else ""
        return (
            f"{self.direction}: {self.tensors} tensors{dt}, {human_bytes(self.bytes)} in "
            f"{self.seconds:.1f} s ({rate:.1f} MB/s), {self.files} data files -> {self.dst}"
        )


def human_bytes(n: int) -> str:
    """1234567 -> '1.23 MB' (decimal units, like the disk tools)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def progress_bar(total_bytes: int, desc: str, enabled: bool = True):
    """A tqdm bar counting bytes (quiet when disabled or when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total_bytes,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
