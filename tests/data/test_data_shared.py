"""Real tokenizers and real data from ../shared (skipped when absent): ids byte-identical to HF
``tokenizers`` (Qwen2) and ``sentencepiece`` (LLaMA-2 BPE, Chinese-LLaMA unigram) in every mode."""

from __future__ import annotations

import pytest
from data_fixtures import check_accounting, expected_texts, hf_ids, read_docs

from sfmed.config.data import PreprocessConfig, SourceConfig
from sfmed.data.preprocess import preprocess

pytestmark = pytest.mark.shared


def _sources(shared_dir):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import REPO
    from sfmed.config.data import register

    register()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "preprocess",
            overrides=[
                "sources=[huatuo26m_test,medicalgpt_sft]",
                "tokenizer=t",
                "output_dir=o",
            ],
        )
    sources = OmegaConf.to_object(cfg).sources
    from sfmed.data.io import expand_files

    for s in sources.values():
        assert expand_files(s.files, shared_dir / "data")  # raises if the shared data moved
    return sources


@pytest.mark.parametrize(("clean", "dedup"), [(False, "none"), (True, "exact"), (True, "near")])
def test_qwen2_ids_identical_to_hf_on_real_data(
    shared_dir, qwen2_tokenizer_dir, tmp_path, clean, dedup
):
    sources = _sources(shared_dir)
    cfg = PreprocessConfig(
        tokenizer=str(qwen2_tokenizer_dir),
        output_dir=str(tmp_path / "out"),
        data_root=str(shared_dir / "data"),
        sources=sources,
        clean=clean,
        dedup=dedup,
    )
    report = preprocess(cfg)
    check_accounting(report)
    assert report["settings"]["tokenizer"]["backend"] == "gigatoken"
    assert report["sources"]["huatuo26m_test"]["records_read"] == 6000
    eod = report["settings"]["tokenizer"]["eod_id"]
    assert eod == 151643
    expected = expected_texts(shared_dir / "data", sources, cfg)
    for name in sources:
        docs = read_docs(tmp_path / f"out/{name}_text_document")
        ref = hf_ids(qwen2_tokenizer_dir, expected[name], eod)
        if dedup == "near":  # near-duplicates are a subset of what exact dedup keeps
            dropped = report["sources"][name]["dropped"]["near_duplicate"]
            assert len(docs) == len(ref) - dropped
            ref_set = {tuple(r) for r in ref}
            assert all(tuple(d) in ref_set for d in docs)
        else:
            assert docs == ref, name


@pytest.mark.parametrize(
    ("model", "backend"),
    [
        ("llama2-sentencepiece/tokenizer.model", "gigatoken"),
        ("chinese-sp-sentencepiece/chinese_sp.model", "sentencepiece"),
    ],
)
def test_sentencepiece_ids_identical_on_real_data(shared_dir, tmp_path, model, backend):
    import sentencepiece as spm

    path = shared_dir / "tokenizers" / model
    if not path.is_file():
        pytest.skip(f"{path} not present")
    src = SourceConfig(
        files=["huatuo26M_test/huatuo26M_test.json"],
        reader="json",
        render="template",
        template=["问：{instruction}", "{input}", "答：{output}"],
        required=["instruction", "output"],
    )
    cfg = PreprocessConfig(
        tokenizer=str(path),
        output_dir=str(tmp_path / "out"),
        data_root=str(shared_dir / "data"),
        sources={"h": src},
    )
    report = preprocess(cfg)
    assert report["settings"]["tokenizer"]["backend"] == backend
    sp = spm.SentencePieceProcessor(model_file=str(path))
    texts = expected_texts(shared_dir / "data", {"h": src}, cfg)["h"]
    assert read_docs(tmp_path / "out/h_text_document") == [
        ids + [sp.eos_id()] for ids in sp.encode(texts)
    ]
    assert report["settings"]["dtype"] == "uint16"
