"""Session fixtures of the HF-engine tests, loaded with ``pytest_plugins = ["hf_fixtures"]`` (a
conftest.py in this folder would shadow tests/conftest.py for other folders' ``from conftest
import ...``)."""

from __future__ import annotations

import pytest
from hf_helpers import model_with_tokenizer, prepare


@pytest.fixture(scope="session")
def hf_model(tiny_qwen2_factory, tiny_tokenizer_dir, tmp_path_factory):
    """A tiny random Qwen2 folder with the tiny tokenizer (real ChatML special tokens)."""
    return model_with_tokenizer(
        tiny_qwen2_factory(), tiny_tokenizer_dir, tmp_path_factory.mktemp("hfm") / "model"
    )


@pytest.fixture(scope="session")
def packed_prefix(tiny_tokenizer_dir, tmp_path_factory):
    """48 conversations packed into 256-token samples."""
    return prepare(tmp_path_factory.mktemp("packed"), tiny_tokenizer_dir, pack=True)


@pytest.fixture(scope="session")
def unpacked_prefix(tiny_tokenizer_dir, tmp_path_factory):
    """The same 48 conversations, one per sample."""
    return prepare(tmp_path_factory.mktemp("unpacked"), tiny_tokenizer_dir, pack=False)
