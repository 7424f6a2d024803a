"""Byte sizes as users write them (transformers' ``max_shard_size`` spelling)."""

from __future__ import annotations

import re

from sfmed.core.errors import ConfigError


def parse_size(size: str | int, what: str = "max_shard_size") -> int:
    """'5GB' / '500MB' / '2GiB' / 123 -> bytes; :class:`ConfigError` naming ``what`` otherwise."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ConfigError(f"{what}={size!r} must be >= 1 byte")
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise ConfigError(f"{what}={size!r}: use e.g. 5GB, 500MB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2) or " ")
    try:
        n = int(float(m.group(1)) * base**power)
    except ValueError:
        raise ConfigError(f"{what}={size!r}: use e.g. 5GB, 500MB or a number of bytes") from None
    if n < 1:
        raise ConfigError(f"{what}={size!r} must be at least 1 byte")
    return n
