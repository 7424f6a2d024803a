"""Tokenizer backends (gigatoken and its fallbacks) and the .bin/.idx format vs megatron-core."""

from __future__ import annotations

import numpy as np
import pytest

from sfmed.data.indexed import BulkIndexedWriter, index_bytes, optimal_dtype, read_index_header
from sfmed.data.metadata import tokenizer_hash
from sfmed.data.tokenizer import TokenizerError, load_tokenizer, reference_encoder

TEXTS = [
    "患者男性，45岁，因发热、咳嗽三天就诊。体温38.5℃。",
    "问：高血压患者平时饮食需要注意什么？\n答：低盐低脂饮食。",
    "The quick brown fox; Aspirin 100 mg daily. CT, MRI, ECG.",
    "  leading and trailing  \n\n\t tabs\r\n",
    "e\u0301 ﬁ ① ＡＢＣ 😀 𠀀",
    "special <|endoftext|> inside <|im_start|>user",
    "",
    "x",
]


def _per_doc(tok, texts):
    ids, off = tok.encode_flat(texts)
    return [ids[off[i] : off[i + 1]].tolist() for i in range(len(texts))]


def test_gigatoken_equals_hf_on_tiny_tokenizer(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir, "auto")
    assert tok.info.backend == "gigatoken" and tok.info.fallback_reason is None
    assert tok.info.eod_token == "<|endoftext|>" and tok.info.vocab_size == 600
    ref = reference_encoder(tiny_tokenizer_dir)
    assert _per_doc(tok, TEXTS) == [ref(t) for t in TEXTS]
    hf = load_tokenizer(tiny_tokenizer_dir, "hf")
    assert hf.info.backend == "hf" and _per_doc(hf, TEXTS) == [ref(t) for t in TEXTS]
    assert hf.info.eod_id == tok.info.eod_id and hf.info.hash == tok.info.hash


def _train_hf(tmp_path, model: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = [t for t in TEXTS if t] * 5
    if model == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=120, special_tokens=["<unk>", "</s>"], unk_token="<unk>"
        )
    else:
        tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
        trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainer)
    d = tmp_path / model
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.mark.parametrize("model", ["unigram", "wordpiece"])
def test_fallback_to_hf_when_gigatoken_cannot(tmp_path, model):
    d = _train_hf(tmp_path, model)
    tok = load_tokenizer(d, "auto", eod_token="</s>")
    assert tok.info.backend == "hf" and tok.info.fallback_reason
    ref = reference_encoder(d)
    texts = [t for t in TEXTS if "<|" not in t]
    assert _per_doc(tok, texts) == [ref(t) for t in texts]
    with pytest.raises(TokenizerError, match="gigatoken cannot load"):
        load_tokenizer(d, "gigatoken", eod_token="</s>")
    with pytest.raises(TokenizerError, match="neither <\\|endoftext\\|> nor an eos_token"):
        load_tokenizer(d, "auto")


def _train_sp(tmp_path, model_type: str):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([t for t in TEXTS if t.strip()] * 20), encoding="utf-8")
    prefix = tmp_path / model_type
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=360,
        model_type=model_type,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.mark.parametrize(
    ("model_type", "backend"), [("bpe", "gigatoken"), ("unigram", "sentencepiece")]
)
def test_sentencepiece_models(tmp_path, model_type, backend):
    model = _train_sp(tmp_path, model_type)
    tok = load_tokenizer(model, "auto")
    assert tok.info.backend == backend and tok.info.kind == "sentencepiece"
    assert tok.info.eod_token == "</s>" and tok.info.hash == tokenizer_hash(model)
    ref = reference_encoder(model)
    assert _per_doc(tok, TEXTS) == [ref(t) for t in TEXTS]
    if backend == "gigatoken":  # the fallback library agrees too
        assert _per_doc(load_tokenizer(model, "sentencepiece"), TEXTS) == [ref(t) for t in TEXTS]


def test_tokenizer_hash_ignores_reserialisation(tmp_path, tiny_tokenizer_dir):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_tokenizer_dir, copy)
    data = json.loads((copy / "tokenizer.json").read_text())
    data["model"]["merges"] = [
        m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]
    ]
    data["decoder"] = None
    (copy / "tokenizer.json").write_text(json.dumps(data, indent=4))
    assert tokenizer_hash(copy) == tokenizer_hash(tiny_tokenizer_dir)
    data["added_tokens"][0]["content"] = "<|other|>"
    (copy / "tokenizer.json").write_text(json.dumps(data))
    assert tokenizer_hash(copy) != tokenizer_hash(tiny_tokenizer_dir)


@pytest.mark.parametrize("vocab", [600, 151646])
def test_idx_bytes_equal_megatron_builder(tmp_path, vocab):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

    dtype = optimal_dtype(vocab)
    assert dtype == DType.optimal_dtype(vocab)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=n).astype(dtype) for n in (1, 7, 300, 2, 1000)]
    ref = tmp_path / "ref"
    b = IndexedDatasetBuilder(f"{ref}.bin", dtype=dtype.type)  # megatron wants the scalar type
    for d in docs:
        b.add_document(d, [len(d)])
    b.finalize(f"{ref}.idx")

    ours = tmp_path / "ours"
    with BulkIndexedWriter(ours, dtype) as w:
        w.add_chunk(np.concatenate(docs[:2]), [len(d) for d in docs[:2]])
        w.add_chunk(np.concatenate(docs[2:]), [len(d) for d in docs[2:]])
        w.finish()
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert (
        index_bytes(np.array([len(d) for d in docs]), dtype) == (tmp_path / "ref.idx").read_bytes()
    )
    ds = IndexedDataset(str(ours))
    assert len(ds) == len(docs) and all(np.array_equal(ds[i], d) for i, d in enumerate(docs))
    assert read_index_header(ours) == {
        "dtype": np.dtype(dtype).name,
        "sequences": 5,
        "documents": 5,
        "tokens": 1310,
    }


def test_writer_abort_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), BulkIndexedWriter(tmp_path / "x", np.uint16) as w:
        w.add_chunk(np.arange(5), [2, 3])
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
