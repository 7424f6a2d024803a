"""DPO with PEFT LoRA through the HF engine: the reference is the policy with the adapter
disabled (no second model is loaded), preferences are learnt on the toy set (chosen answers
recommend seeing a doctor), and the merged and adapter exports load."""

from __future__ import annotations

import pytest
import torch
from dpo_hf_helpers import engine_cfg, metrics

from sfmed.hf_engine.dpo import run

pytest_plugins = ["dpo_hf_fixtures"]

pytestmark = pytest.mark.slow  # 10 LoRA steps and the export checks


@pytest.fixture(scope="module")
def lora_run(dpo_model, pairs_prefix, tmp_path_factory):
    import trl.trainer.dpo_trainer as dpo_trainer

    d = tmp_path_factory.mktemp("dpo_lora") / "run"
    cfg = engine_cfg(
        dpo_model, pairs_prefix, d, "hf.lora.enabled=true", "hf.lora.r=8", "hf.export=both",
        "reference.mode=on_the_fly", "train.steps=10", "optim.lr=5e-3",
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as m:
        # a reference copy would be loaded through this; with LoRA there must be none
        def no_copy(*a, **k):
            raise AssertionError("a second model was loaded for the reference")

        m.setattr(dpo_trainer, "create_model_from_path", no_copy)
        assert run(cfg) == "complete"
    return d


def test_preferences_are_learnt(lora_run):
    r = metrics(lora_run)
    assert [x["step"] for x in r] == list(range(1, 11))
    assert r[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # B = 0: policy = reference
    tail = r[-3:]
    assert max(x["loss"] for x in tail) < 0.5 * r[0]["loss"]
    assert min(x["rewards/accuracies"] for x in tail) >= 0.75
    assert min(x["rewards/margins"] for x in tail) > r[1]["rewards/margins"] > 0


def test_exports_load(lora_run, dpo_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[598, 82, 88, 82, 83, 68, 76, 198]])
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(dpo_model).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(dpo_model), lora_run / "adapter"
    ).eval()
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (merged, adapted, base))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4)  # the adapter trained something
