"""Training's pre-flight checks of indexed datasets (sfmed.data.checks): tokenizer fit, empty
data, maximum ids without a sidecar, and megatron-core's split arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO
from sfmed.core.errors import ConfigError
from sfmed.data.checks import check_prefix, check_splits, max_token_id, split_sizes
from sfmed.data.indexed import BulkIndexedWriter
from sfmed.data.metadata import write_sidecar


def _write(prefix, docs: list[list[int]], dtype=np.uint16, tokenizer: dict | None = None):
    """An indexed dataset of ``docs``; with a sidecar recording ``tokenizer`` when given."""
    w = BulkIndexedWriter(prefix, dtype)
    if docs:
        w.add_chunk(np.concatenate([np.asarray(d) for d in docs]), np.array([len(d) for d in docs]))
    w.finish()
    if tokenizer is not None:
        meta = {
            "tokenizer": tokenizer,
            "documents": w.documents,
            "bin_bytes": w.bin_bytes,
            "idx_bytes": w.idx_bytes,
        }
        write_sidecar(prefix, meta)
    return str(prefix)


QWEN2 = {"path": "tok/qwen2", "hash": "a1b2c3d4e5f60718", "vocab_size": 151646, "eod_id": 151643}


def test_sidecar_tokenizer_against_the_model(tmp_path):
    p = _write(tmp_path / "qwen_text_document", [[5, 151643], [7, 8, 151643]], np.int32, QWEN2)
    # The tiny model (1,000 ids) on Qwen2 data: issue 9.1's run that trained silently.
    (msg,) = check_prefix(p, vocab_size=1000)
    for part in (p, "tok/qwen2", "151,646", "1,000", "launch/preprocess.py tokenizer="):
        assert part in msg, (part, msg)
    # Padded Qwen2 vocabulary, same tokenizer: fine.
    assert check_prefix(p, vocab_size=151936, tokenizer_hash=QWEN2["hash"], eod_id=151643) == []
    problems = check_prefix(p, vocab_size=151936, tokenizer_hash="ffffffffffffffff", eod_id=2)
    assert len(problems) == 2
    assert "a1b2c3d4e5f60718" in problems[0] and "ffffffffffffffff" in problems[0]
    assert "EOD id is 2" in problems[1] and "EOD id 151643" in problems[1]
    # Every problem at once.
    assert len(check_prefix(p, vocab_size=1000, tokenizer_hash="f" * 16, eod_id=2)) == 3


def test_empty_prefixes_are_problems(tmp_path):
    tok = {"path": "tok", "hash": "h", "vocab_size": 600, "eod_id": 597}
    empty = _write(tmp_path / "empty_text_document", [], tokenizer=tok)
    (msg,) = check_prefix(empty, vocab_size=1000)
    assert "is empty (0 documents, 0 bytes" in msg and empty in msg and "report.md" in msg
    # A 0-byte .bin without a sidecar (what preprocessing used to leave behind).
    bare = _write(tmp_path / "bare_text_document", [])
    assert (tmp_path / "bare_text_document.bin").stat().st_size == 0
    (msg,) = check_prefix(bare, vocab_size=1000)
    assert "is empty" in msg
    (msg,) = check_prefix(tmp_path / "nothing_text_document", vocab_size=1000)
    assert "nothing_text_document.bin" in msg and "not found" in msg
    (msg,) = check_prefix(str(tmp_path / "x_text_document.bin"), vocab_size=1000)
    assert "without .bin/.idx/.json" in msg
    # A sidecar that no longer matches its files.
    ok = _write(tmp_path / "ok_text_document", [[1, 2, 597]], tokenizer=tok)
    with open(f"{ok}.bin", "ab") as f:
        f.write(b"\0\0")
    (msg,) = check_prefix(ok, vocab_size=1000)
    assert "re-run launch/preprocess.py" in msg


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_max_token_id_without_sidecar(tmp_path, dtype, monkeypatch):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 900, size=int(rng.integers(1, 50))).tolist() for _ in range(300)]
    docs[123][-1] = 1234
    p = _write(tmp_path / f"other_{np.dtype(dtype).name}", docs, dtype)
    # Small chunks so that the pass crosses chunk boundaries; the reference is plain Python.
    monkeypatch.setattr("sfmed.data.checks._CHUNK_IDS", 97)
    assert max_token_id(p) == max(max(d) for d in docs) == 1234
    (msg,) = check_prefix(p, vocab_size=1000)
    assert "no .json sidecar" in msg and "1,234" in msg and "1,000" in msg
    assert check_prefix(p, vocab_size=1235) == []


def test_checks_import_neither_torch_nor_orjson():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'orjson', 'megatron'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from sfmed.data.checks import check_prefix, split_sizes\n"
        "print(split_sizes(4))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[4, 0, None]"


def _megatron_split_sizes(tmp_path, monkeypatch, n: int, split: str) -> list[int | None]:
    """What megatron-core's own BlendedMegatronDatasetBuilder gives each split of an ``n``
    document dataset (its dataset constructor replaced by a recorder)."""
    from megatron.core.datasets import blended_megatron_dataset_builder as bmdb
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefix = tmp_path / f"n{n}"
    if not (tmp_path / f"n{n}.idx").exists():
        _write(prefix, [[i % 7 + 1, 0] for i in range(n)] if n else [])
    cfg = GPTDatasetConfig(
        random_seed=1,
        sequence_length=4,
        blend=([str(prefix)], None),
        split=split,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        tokenizer=SimpleNamespace(eod=0, pad=0, vocab_size=None, unique_identifiers={}),
        mid_level_dataset_surplus=0.005,
    )
    seen: dict[str, int] = {}

    def record(cls, is_built_on_rank, synchronize_ranks, low, path, indices, size, split_, config):
        seen[split_.name] = len(indices)
        return None

    builder = bmdb.BlendedMegatronDatasetBuilder(GPTDataset, [1, 1, 1], lambda: True, cfg)
    with monkeypatch.context() as m:
        m.setattr(bmdb.BlendedMegatronDatasetBuilder, "build_generic_dataset", staticmethod(record))
        builder._build_megatron_dataset_splits(str(prefix), cfg.split_matrix, [1, 1, 1])
    return [seen.get(name) for name in ("train", "valid", "test")]


CASES = [
    (n, s)
    for s in ("99,1,0", "98,1,1", "90,10,0", "1", "949,50,1", "0.7,0.2,0.1", "2,1", "0,1,0")
    for n in (1, 4, 49, 50, 51, 150, 1001)
]


def test_split_sizes_equal_megatron_core(tmp_path, monkeypatch):
    for n, split in CASES:
        got = _megatron_split_sizes(tmp_path, monkeypatch, n, split)
        assert split_sizes(n, split) == got, (n, split)
    # The case of issue 9.3: 4 documents, default split -> an empty validation split.
    assert split_sizes(4) == [4, 0, None]


def test_check_splits_names_the_split_and_the_fix():
    (msg,) = check_splits(4, "99,1,0", prefix="data/tiny_text_document")
    assert "data/tiny_text_document" in msg and "4 documents" in msg and "valid split" in msg
    # "at least N" is the smallest corpus that gives the split a document.
    n = int(msg.split("at least ")[1].split(" ")[0].replace(",", ""))
    assert split_sizes(n)[1] == 1 and split_sizes(n - 1)[1] == 0
    assert "eval_interval=0" in msg
    assert check_splits(4, "99,1,0", needed=("train",)) == []
    assert check_splits(1000, "99,1,0") == []
    assert check_splits(0, "99,1,0") and "train split" in check_splits(0, "99,1,0")[0]
    for bad in ("", "1,2,3,4", "0,0,0"):
        with pytest.raises(ConfigError, match="split="):
            split_sizes(10, bad)


def test_sidecar_of_a_real_preprocessing_run(tmp_path, tiny_tokenizer_dir):
    """The sidecar preprocessing writes carries what check_prefix compares."""
    from data_fixtures import qa_rows, write_jsonl

    from sfmed.config.data import PreprocessConfig
    from sfmed.data.metadata import tokenizer_hash
    from sfmed.data.preprocess import preprocess

    write_jsonl(tmp_path / "qa.jsonl", [{"text": r["question"] + r["answer"]} for r in qa_rows(5)])
    cfg = PreprocessConfig(
        input=str(tmp_path / "qa.jsonl"),
        tokenizer=str(tiny_tokenizer_dir),
        output_dir=str(tmp_path),
    )
    preprocess(cfg)
    prefix = tmp_path / "qa_text_document"
    meta = json.loads((tmp_path / "qa_text_document.json").read_text())
    eod = meta["tokenizer"]["eod_id"]
    h = tokenizer_hash(tiny_tokenizer_dir)
    assert check_prefix(prefix, vocab_size=1000, tokenizer_hash=h, eod_id=eod) == []
    assert len(check_prefix(prefix, vocab_size=100, tokenizer_hash=h, eod_id=eod)) == 1
