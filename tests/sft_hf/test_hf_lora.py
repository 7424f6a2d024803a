"""LoRA through PEFT on the small multi-turn set (section 6, HF part): the supervised loss falls,
only the adapters train, and both exports load (merged with transformers, adapter-only with
PEFT on the base) and ``generate()`` runs with the chat template."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import engine_cfg, metrics

from sfmed.hf_engine.sft import run

pytest_plugins = ["hf_fixtures"]

pytestmark = pytest.mark.slow
STEPS = 20


@pytest.fixture(scope="module")
def lora_run(hf_model, packed_prefix, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora") / "run"
    cfg = engine_cfg(
        hf_model, packed_prefix, d, f"train.steps={STEPS}", "hf.lora.enabled=true",
        "hf.lora.r=8", "hf.lora.alpha=16", "hf.lora.dropout=0.0", "hf.export=both",
        "optim.lr=1e-2", "optim.min_lr=1e-3",
    )  # fmt: skip
    assert run(cfg) == "complete"
    return d


def _prompt(tok):
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "孩子咳嗽"}], add_generation_prompt=True, return_tensors="pt"
    )
    return ids["input_ids"] if hasattr(ids, "keys") else ids


def test_lora_loss_falls(lora_run):
    m = metrics(lora_run)
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    first = m[0]["loss"]
    last = sum(r["loss"] for r in m[-3:]) / 3
    assert last < first - 0.5, (first, last)


def test_exports_load_and_generate(lora_run, hf_model):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, merged = lora_run / "adapter", lora_run / "merged"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["r"] == 8 and conf["lora_alpha"] == 16
    assert set(conf["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    assert not (lora_run / "hf").exists()

    # only the adapted projections changed: merged = base + B A * alpha / r there
    base_sd, merged_sd = load_file(hf_model / "model.safetensors"), {}
    for f in merged.glob("*.safetensors"):
        merged_sd.update(load_file(f))
    assert base_sd.keys() == merged_sd.keys()
    changed = {k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed)
    assert not any("embed" in k or "norm" in k or "lm_head" in k for k in changed)

    tok = AutoTokenizer.from_pretrained(merged)
    ids = _prompt(tok)
    m_model = AutoModelForCausalLM.from_pretrained(merged).eval()
    p_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_model), adapter)
    b_model = AutoModelForCausalLM.from_pretrained(hf_model).eval()
    p_model.eval()
    with torch.no_grad():
        lm, lp, lb = (x(input_ids=ids).logits for x in (m_model, p_model, b_model))
    torch.testing.assert_close(lm, lp, rtol=1e-4, atol=1e-4)
    assert (lm - lb).abs().max() > 1e-2
    for model in (m_model, p_model):
        gen = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        assert gen.shape[1] > ids.shape[1]
        assert isinstance(tok.decode(gen[0, ids.shape[1] :]), str)
