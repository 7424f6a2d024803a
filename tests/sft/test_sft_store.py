"""The chat dataset layout: Megatron-identical multi-sequence documents, reader errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sfmed.data.chat.store import ChatWriter, PreferenceDataset, SFTDataset, mask_prefix
from sfmed.data.indexed import BulkIndexedWriter


def test_multi_sequence_documents_equal_megatron_builder(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [
        [rng.integers(0, 60000, int(n)) for n in rng.integers(1, 30, int(k))]
        for k in rng.integers(1, 6, 20)
    ]
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.int32)
    for d in docs:
        ref.add_document(np.concatenate(d), [len(s) for s in d])
    ref.finalize(str(tmp_path / "ref.idx"))
    w = BulkIndexedWriter(tmp_path / "ours", np.int32)
    for d in docs:
        w.add_chunk(np.concatenate(d), np.array([len(s) for s in d]))
    w.finish(np.cumsum([0] + [len(d) for d in docs]))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    with pytest.raises(ValueError, match="document_indices"):
        BulkIndexedWriter(tmp_path / "bad", np.int32).finish(np.array([0, 2]))


def test_reader_errors_and_empty_dataset(tmp_path):
    p = tmp_path / "x_sft"
    with pytest.raises(FileNotFoundError, match="not a complete chat dataset"):
        SFTDataset(p)
    w = ChatWriter(p, np.uint16)
    w.finish({"kind": "sft", "seq_length": 64})
    ds = SFTDataset(p)
    assert len(ds) == 0 and ds.sample_lengths.tolist() == []
    with pytest.raises(IndexError):
        ds[0]
    with pytest.raises(ValueError, match="not preference"):
        PreferenceDataset(p)
    # A mask that does not match the ids is refused.
    w = ChatWriter(p, np.uint16)
    w.add_sample([np.arange(5)], [np.ones(5, np.uint8)])
    w.finish({"kind": "sft", "seq_length": 64})
    m = BulkIndexedWriter(mask_prefix(p), np.uint8)
    m.add_chunk(np.ones(4, np.uint8), np.array([4]))
    m.finish()
    with pytest.raises(ValueError, match="mask dataset does not match"):
        SFTDataset(p)
    assert json.loads((tmp_path / "x_sft.json").read_text())["kind"] == "sft"


def test_writer_abort_leaves_nothing(tmp_path):
    w = ChatWriter(tmp_path / "y_sft", np.uint16)
    w.add_sample([np.arange(3)], [np.zeros(3, np.uint8)])
    w.abort()
    assert list(tmp_path.iterdir()) == []
