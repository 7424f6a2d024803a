"""The HF engine's rows and sample order: the same targets and order as the stored data."""

from __future__ import annotations

import numpy as np
import torch
from hf_helpers import conversation_pieces

from sfmed.data.chat.store import SFTDataset
from sfmed.hf_engine.data import hf_row, ordered_rows, sample_order, train_parts

pytest_plugins = ["hf_fixtures"]


def test_rows_carry_the_stored_targets(packed_prefix, unpacked_prefix):
    for prefix in (packed_prefix, unpacked_prefix):
        ds = SFTDataset(prefix)
        for i in range(len(ds)):
            row = hf_row(ds[i])
            pieces = conversation_pieces(prefix, i)
            ids = np.concatenate([p[0] for p in pieces])
            mask = np.concatenate([p[1] for p in pieces])
            assert row["input_ids"] == ids.tolist()
            assert row["seq_lengths"] == [len(p[0]) for p in pieces]
            want = np.where(mask > 0, ids, -100)
            # a conversation's first token is never a target (the system turn starts it)
            starts = np.cumsum([0] + row["seq_lengths"][:-1])
            assert (want[starts] == -100).all()
            assert row["labels"] == want.tolist()
        assert any(len(hf_row(ds[i])["seq_lengths"]) > 1 for i in range(len(ds))) == (
            prefix == packed_prefix
        )


def test_sample_order():
    parts = train_parts([5, 3], (100, 0, 0), seed=7)
    assert sorted(parts[0].tolist()) == list(range(5)) and sorted(parts[1].tolist()) == [0, 1, 2]
    order = sample_order(parts, [2.0, 1.0], 60, seed=7)
    # shares follow the weights at every prefix (greedy blending)
    for n in (3, 30, 60):
        assert abs((order[:n, 0] == 0).sum() - 2 * n / 3) <= 1
    # within a dataset every epoch is a permutation of its part, and epochs differ
    first = order[order[:, 0] == 0][:, 1]
    for e in range(len(first) // 5):
        assert sorted(first[5 * e : 5 * e + 5].tolist()) == list(range(5))
    assert len({tuple(first[5 * e : 5 * e + 5]) for e in range(len(first) // 5)}) > 1
    np.testing.assert_array_equal(order, sample_order(parts, [2.0, 1.0], 60, seed=7))
    assert not np.array_equal(order, sample_order(parts, [2.0, 1.0], 60, seed=8))
    # a split keeps a seeded part of each dataset
    tr = train_parts([10], (80, 20, 0), seed=1)[0]
    assert len(tr) == 8 and len(set(tr.tolist())) == 8
    assert len(train_parts([1], (50, 50, 0), seed=1)[0]) == 1  # never empty


def test_packed_rows_train_like_separate_conversations(hf_model, packed_prefix, tmp_path):
    """A packed micro-batch through TRL's padding-free collator and SDPA/eager attention gives
    the summed loss of its conversations run one by one (no cross-talk, no label across)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    ds = SFTDataset(packed_prefix)
    order = np.array([[0, 0], [0, 1]])
    rows = ordered_rows([packed_prefix], order, tmp_path / "cache")
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([rows[0], rows[1]])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(hf_model, attn_implementation=attn)
        model.config.use_cache = False
        n = int((batch["labels"][..., 1:] != -100).sum())
        out = model(**batch, num_items_in_batch=n)
        ref, count = 0.0, 0
        for s in (0, 1):
            for ids, mask in conversation_pieces(packed_prefix, s):
                logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0]
                tgt = torch.as_tensor(mask[1:]) > 0
                ref += torch.nn.functional.cross_entropy(
                    logits[:-1][tgt], torch.as_tensor(ids[1:])[tgt], reduction="sum"
                ).item()
                count += int(tgt.sum())
        assert count == n == int(ds[0]["loss_mask"].sum() + ds[1]["loss_mask"].sum())
        torch.testing.assert_close(out.loss.item(), ref / count, rtol=1e-5, atol=0)
