"""Folders whose model or tokenizer class is the release's own code (``auto_map``: Baichuan's
``modeling_baichuan.py`` / ``tokenization_baichuan.py``) are refused before anything loads,
with the fix; a SentencePiece tokenizer folder gives the pretraining EOD id without transformers."""

from __future__ import annotations

import json
import shutil

import pytest

from sfmed.config.eval import EvalConfigError, HFConfig, check_remote_code
from sfmed.models import get_family

TOKENIZER_CONFIG = {
    "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
    "tokenizer_class": "BaichuanTokenizer",
}


@pytest.fixture(scope="module")
def baichuan_dir(tmp_path_factory):
    """A tiny exported Baichuan folder: config.json with auto_map, tokenizer_config with auto_map,
    a tokenizer.model, but none of the release's .py files."""
    d = get_family("baichuan").make_tiny(tmp_path_factory.mktemp("bc") / "m")
    (d / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    (d / "tokenizer.model").write_bytes(b"placeholder")
    return d


def test_hf_backend_refuses_remote_code_without_trust(baichuan_dir):
    from sfmed.eval.backends.hf import HFBackend

    (baichuan_dir / "modeling_baichuan.py").write_text("")
    (baichuan_dir / "tokenization_baichuan.py").write_text("")
    try:
        with pytest.raises(EvalConfigError, match=r"hf\.trust_remote_code=true") as e:
            HFBackend(baichuan_dir, HFConfig())
        assert "modeling_baichuan.py" in str(e.value)
    finally:
        (baichuan_dir / "modeling_baichuan.py").unlink()
        (baichuan_dir / "tokenization_baichuan.py").unlink()


def test_missing_code_is_named_even_with_trust(baichuan_dir):
    with pytest.raises(EvalConfigError, match=r"copy modeling_baichuan\.py"):
        check_remote_code(str(baichuan_dir), None, True)


def test_tokenizer_code_checked_in_its_own_folder(baichuan_dir, tmp_path):
    # model folder with its code present and trusted; a separate tokenizer folder without its code
    model = tmp_path / "model"
    shutil.copytree(baichuan_dir, model)
    (model / "modeling_baichuan.py").write_text("")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    with pytest.raises(EvalConfigError, match=r"tokenizer in .*tok.*tokenization_baichuan\.py"):
        check_remote_code(str(model), str(tok), True)
    (tok / "tokenization_baichuan.py").write_text("")
    check_remote_code(str(model), str(tok), True)  # code present and trusted: accepted
    with pytest.raises(EvalConfigError, match="trust_remote_code"):
        check_remote_code(str(model), str(tok), False)


def test_transformers_folders_need_no_trust(tmp_path):
    d = get_family("qwen2").make_tiny(tmp_path / "q")
    (d / "tokenizer.json").write_text("{}")
    check_remote_code(str(d), None, False)  # no auto_map: nothing to refuse


def test_pretrain_eod_from_sentencepiece_folder(shared_dir, tmp_path):
    import sentencepiece as spm

    from sfmed.recipes.pretrain import _eod_from_tokenizer

    src = shared_dir / "tokenizers" / "llama2-sentencepiece" / "tokenizer.model"
    if not src.is_file():
        pytest.skip(f"{src} not present")
    # a Baichuan-like folder: tokenizer.model + a tokenizer_config naming remote code
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(src, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    sp = spm.SentencePieceProcessor(model_file=str(src))
    assert _eod_from_tokenizer(str(d), "</s>") == sp.piece_to_id("</s>") == 2
    assert _eod_from_tokenizer(str(d), None) == sp.eos_id()
