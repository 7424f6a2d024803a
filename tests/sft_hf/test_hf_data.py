"""The HF engine's rows: the sharded engine's samples, as TRL rows with the stored targets, and
a packed micro-batch that trains like its conversations run one by one."""

from __future__ import annotations

import numpy as np
import torch
from hf_helpers import conversation_pieces, first_samples, sample_stream

from sfmed.hf_engine.data import hf_row, ordered_rows

pytest_plugins = ["hf_fixtures"]


def test_rows_carry_the_stored_targets(hf_model, packed_prefix, unpacked_prefix):
    for prefix in (packed_prefix, unpacked_prefix):
        stream = sample_stream(hf_model, prefix, 8)
        multi = False
        for i, idx in enumerate(first_samples(prefix, 8)):
            row = hf_row(stream[i])
            pieces = conversation_pieces(prefix, idx)  # straight from the .bin/.idx files
            ids = np.concatenate([p[0] for p in pieces])
            mask = np.concatenate([p[1] for p in pieces])
            assert row["input_ids"] == ids.tolist()  # no padding
            assert row["seq_lengths"] == [len(p[0]) for p in pieces]
            assert row["labels"] == np.where(mask > 0, ids, -100).tolist()
            # a conversation's first token is never a target (the system turn starts it)
            starts = np.cumsum([0] + row["seq_lengths"][:-1])
            assert all(row["labels"][s] == -100 for s in starts)
            multi |= len(pieces) > 1
        assert multi == (prefix == packed_prefix)


def test_packed_rows_train_like_separate_conversations(hf_model, packed_prefix, tmp_path):
    """A packed micro-batch through TRL's padding-free collator and SDPA/eager attention gives
    the summed loss of its conversations run one by one (no cross-talk, no label across)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = ordered_rows(sample_stream(hf_model, packed_prefix, 2), tmp_path / "cache")
    assert len(rows) == 2
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([rows[0], rows[1]])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    pieces = [
        p for s in first_samples(packed_prefix, 2) for p in conversation_pieces(packed_prefix, s)
    ]
    assert len(pieces) > 2
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(hf_model, attn_implementation=attn)
        model.config.use_cache = False
        n = int((batch["labels"][..., 1:] != -100).sum())
        out = model(**batch, num_items_in_batch=n)
        ref, count = 0.0, 0
        for ids, mask in pieces:
            logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0]
            tgt = torch.as_tensor(mask[1:]) > 0
            ref += torch.nn.functional.cross_entropy(
                logits[:-1][tgt], torch.as_tensor(ids[1:])[tgt], reduction="sum"
            ).item()
            count += int(tgt.sum())
        assert count == n
        torch.testing.assert_close(out.loss.item(), ref / count, rtol=1e-5, atol=0)
