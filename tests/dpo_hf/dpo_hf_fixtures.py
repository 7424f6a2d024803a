"""Session fixtures of the DPO HF-engine tests, loaded with ``pytest_plugins =
["dpo_hf_fixtures"]`` (a conftest.py here would shadow tests/conftest.py's helpers)."""

from __future__ import annotations

import pytest
from dpo_hf_helpers import model_with_tokenizer, prepare


@pytest.fixture(scope="session")
def dpo_model(tiny_qwen2_factory, tiny_tokenizer_dir, tmp_path_factory):
    """A tiny random Qwen2 folder with the tiny tokenizer (real ChatML special tokens)."""
    return model_with_tokenizer(
        tiny_qwen2_factory(), tiny_tokenizer_dir, tmp_path_factory.mktemp("dpom") / "model"
    )


@pytest.fixture(scope="session")
def pairs_prefix(tiny_tokenizer_dir, tmp_path_factory):
    """48 toy pairs (chosen: see a doctor), one per sample."""
    return prepare(tmp_path_factory.mktemp("pairs"), tiny_tokenizer_dir)
