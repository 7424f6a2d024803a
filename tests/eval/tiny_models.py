"""A tiny chat model fixture shared by evaluation tests (import it into the test module)."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session", name="tiny_chat_model")
def tiny_chat_model_fixture(tiny_qwen2_factory, tiny_tokenizer_dir, tmp_path_factory):
    """Tiny random Qwen2 (vocab 600, the shape test_eval_e2e uses) with the tiny ChatML
    tokenizer copied in."""
    src = tiny_qwen2_factory(
        vocab_size=600,
        num_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=4096,
    )
    dst = tmp_path_factory.mktemp("eval_chat_model") / "tiny"
    shutil.copytree(src, dst)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, dst / f.name)
    return dst
