"""ruff (lint + format) is part of the test suite, so CI fails on unformatted code."""

import shutil
import subprocess

import pytest

from conftest import REPO


@pytest.mark.skipif(
    shutil.which("ruff") is None, reason="ruff not installed (pip install -e .[test])"
)
@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff_clean(args):
    proc = subprocess.run(["ruff", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
