"""The DPO HF engine's rows: the stored pairs as TRL takes them (prompt shared, each side only
its supervised answer), refused when TRL cannot train them; the loss options TRL 1.x has."""

from __future__ import annotations

import numpy as np
import pytest
from dpo_hf_helpers import compose_dpo, prepare, stored_pairs

from sfmed.core.errors import ConfigError
from sfmed.data.chat.store import ChatDataset, PreferenceDataset
from sfmed.hf_engine.data import pair_row
from sfmed.hf_engine.dpo import trl_loss

pytest_plugins = ["dpo_hf_fixtures"]


def test_rows_carry_the_stored_pairs(pairs_prefix, tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    im_end = AutoTokenizer.from_pretrained(tiny_tokenizer_dir).convert_tokens_to_ids("<|im_end|>")
    ds = PreferenceDataset(pairs_prefix)
    stored = stored_pairs(pairs_prefix)
    assert len(stored) == len(ds) == 48
    for i, (c, cm, r, rm) in enumerate(stored):
        row = pair_row(ds[i])
        # by hand from the raw files: the prompt is everything before the first target
        a = int(np.flatnonzero(cm)[0])
        assert row["prompt_ids"] == c[:a].tolist() == r[:a].tolist()
        assert row["chosen_ids"] == c[cm > 0].tolist()
        assert row["rejected_ids"] == r[rm > 0].tolist()
        assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == im_end
        # a trainer's fixed-length item (padding, ``real``) gives the same row
        item = ChatDataset.pad(ds[i], 2 * ds.seq_length, pad_id=0)
        item["real"] = np.arange(2 * ds.seq_length) < len(c) + len(r)
        assert pair_row(item) == row
    # TRL's collator scores exactly the stored targets
    batch = DataCollatorForPreference(pad_token_id=0)([pair_row(ds[0]), pair_row(ds[1])])
    sup = batch["completion_mask"].sum(1).tolist()
    assert sup == [int(stored[0][1].sum()), int(stored[1][1].sum()), int(stored[0][3].sum()),
                   int(stored[1][3].sum())]  # fmt: skip


def test_packed_and_malformed_samples_are_refused(tiny_tokenizer_dir, tmp_path):
    packed = PreferenceDataset(
        prepare(tmp_path, tiny_tokenizer_dir, n=12, pack=True, seq_length=512)
    )
    multi = next(packed[i] for i in range(len(packed)) if len(packed[i]["seq_lengths"]) > 2)
    with pytest.raises(ValueError, match=r"holds \d+ pairs; engine=hf trains one pair"):
        pair_row(multi)
    one = PreferenceDataset(prepare(tmp_path / "u", tiny_tokenizer_dir, n=3))[0]
    bad = dict(one)
    bad["tokens"] = one["tokens"].copy()
    bad["tokens"][1] += 1  # the chosen side's prompt no longer matches the rejected side's
    with pytest.raises(ValueError, match="same prompt"):
        pair_row(bad)
    gap = dict(one)
    gap["loss_mask"] = one["loss_mask"].copy()
    gap["loss_mask"][int(np.flatnonzero(one["loss_mask"])[1])] = 0
    with pytest.raises(ValueError, match="not one span"):
        pair_row(gap)


def _dpo(*o):
    return compose_dpo(["engine=hf", *o])


def test_loss_options_map_to_trl():
    assert trl_loss(_dpo()) == {"beta": 0.1, "label_smoothing": 0.0, "loss_type": ["sigmoid"]}
    ipo = trl_loss(_dpo("dpo.loss_type=ipo", "dpo.beta=0.5"))
    assert ipo["loss_type"] == ["ipo"] and ipo["beta"] == 0.5
    rob = trl_loss(_dpo("dpo.loss_type=robust", "dpo.label_smoothing=0.1"))
    assert rob["loss_type"] == ["robust"] and rob["label_smoothing"] == 0.1
    rpo = trl_loss(_dpo("dpo.loss_type=hinge", "dpo.rpo_alpha=0.5"))
    assert rpo["loss_type"] == ["hinge", "sft"] and rpo["loss_weights"] == [1.0, 0.5]
    with pytest.raises(ConfigError, match=r"label_smoothing=0.1 with dpo.loss_type=sigmoid"):
        trl_loss(_dpo("dpo.label_smoothing=0.1"))
    with pytest.raises(ConfigError, match=r"reference_free=true: TRL 1.x"):
        trl_loss(_dpo("dpo.reference_free=true"))
