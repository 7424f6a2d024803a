"""Real SFT and preference samples from ../shared through format=sft|preference (Qwen2)."""

from __future__ import annotations

import numpy as np
import pytest

from sfmed.config.data import PreprocessConfig, SourceConfig
from sfmed.data.chat.store import PreferenceDataset, SFTDataset
from sfmed.data.preprocess import preprocess

pytestmark = pytest.mark.shared


def real_sft_sources(data) -> dict[str, SourceConfig]:
    """The real multi- and single-turn SFT samples in ../shared, in the corpus YAMLs' shapes."""
    tpl = ["问：{instruction}", "{input}", "答：{output}"]
    return {
        "disc_med": SourceConfig(
            files=[str(data / "DISC-MedLLM/train/test_examples.jsonl")],
            render="dialogue",
            fields={"messages": "conversation"},
        ),
        "medicalgpt_sft": SourceConfig(
            files=[str(data / "MedicalGPT/sft/medical_sft_1K_format.jsonl")], render="dialogue"
        ),
        "huatuo26m_test": SourceConfig(
            files=[str(data / "huatuo26M_test/huatuo26M_test.json")],
            render="template",
            template=tpl,
            required=["instruction", "output"],
        ),
        "huatuo_sft": SourceConfig(
            files=[str(data / "Huatuo-Llama-Med-Chinese/data_llama_data.json")],
            render="template",
            template=tpl,
            required=["instruction", "output"],
        ),
        "chinese_medical_dialogue": SourceConfig(
            files=[str(data / "Chinese-medical-dialogue-data/sample_IM_5000-6000.utf8.csv")],
            render="template",
            template=["问：{title}", "{ask}", "答：{answer}"],
        ),
    }


@pytest.mark.slow
def test_real_sft_packing_efficiency(tmp_path, qwen2_tokenizer_dir, shared_dir):
    cfg = PreprocessConfig(
        tokenizer=str(qwen2_tokenizer_dir),
        output_dir=str(tmp_path),
        sources=real_sft_sources(shared_dir / "data"),
        format="sft",
    )
    rep = preprocess(cfg)
    tot = rep["total"]
    assert tot["kept"] > 0.99 * tot["records"]
    assert tot["packing"]["efficiency"] >= 0.95, tot["packing"]
    st = rep["sources"]["disc_med"]
    assert st["assistant_turns"] > st["kept"]  # multi-turn consultations
    for name, st in rep["sources"].items():
        ds = SFTDataset(tmp_path / f"{name}_sft")
        lengths = ds.sample_lengths
        assert lengths.max() <= 4096 and int(lengths.sum()) == st["tokens"]
        assert len(ds) == st["packing"]["packs"]
        s = ds[len(ds) // 2]
        assert int(s["loss_mask"].sum()) > 0 and len(s["seq_lengths"]) >= 1


def test_real_preference_pairs(tmp_path, qwen2_tokenizer_dir, shared_dir):
    data = shared_dir / "data/MedicalGPT/reward"
    cfg = PreprocessConfig(
        tokenizer=str(qwen2_tokenizer_dir),
        output_dir=str(tmp_path),
        sources={
            "medical_reward": SourceConfig(files=[str(data / "test.json")], reader="jsonl"),
            "dpo_zh": SourceConfig(files=[str(data / "dpo_zh_500.jsonl")]),
        },
        format="preference",
    )
    rep = preprocess(cfg)
    assert rep["sources"]["medical_reward"]["records"] == 100
    assert rep["sources"]["dpo_zh"]["records"] == 500
    for name, st in rep["sources"].items():
        assert st["kept"] >= 0.95 * st["records"], (name, st["dropped"])
        ds = PreferenceDataset(tmp_path / f"{name}_preference")
        n_seq = sum(len(ds[i]["seq_lengths"]) for i in range(len(ds)))
        assert n_seq == 2 * st["kept"]
        s = ds[0]
        cu = s["cu_seqlens"]
        chosen, rejected = (s["tokens"][cu[j] : cu[j + 1]] for j in (0, 1))
        # Shared prompt: both sides start with the same tokens up to the answer.
        k = int(np.argmax(s["loss_mask"][cu[0] : cu[1]] > 0))
        np.testing.assert_array_equal(chosen[:k], rejected[:k])
