"""Fixtures of the model-family tests: one tiny HF folder per family case (cached per session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def family_factory(tmp_path_factory):
    """``make(case_name)`` -> the tiny HF folder of a case of ``family_cases.FAMILY_CASES``."""
    from family_cases import FAMILY_CASES

    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            cache[name] = FAMILY_CASES[name]["make"](d / "hf")
        return cache[name]

    return make
