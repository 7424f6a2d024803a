"""Every ``model=`` preset equals the architecture sfmed reads from the published ``config.json``
of its release. The published fields are written here as literals (the architecture fields of
each release's config.json: model_type, hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, head_dim, vocab_size, max_position_embeddings,
rms_norm_eps, rope_theta, tie_word_embeddings, biases), so a preset typo or a family that reads
a field differently fails here.

Where each literal comes from is in ``SOURCES`` (public files that copy the release's config.json
or hard-code its values with a link to it); the same source is named in the preset's YAML. A
preset marked ``unconfirmed`` has no citable copy of its config.json: its literals here are the
release's documented values as sfmed knows them, and the unconfirmed fields are listed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from sfmed.config.model import ModelConfig
from sfmed.models import arch_from_hf_config

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


def _qwen2(hidden, inter, layers, heads, kv, vocab, max_pos, eps, tied):
    return dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
        max_position_embeddings=max_pos, rms_norm_eps=eps, rope_theta=1000000.0,
        tie_word_embeddings=tied, use_sliding_window=False, torch_dtype="bfloat16",
    )  # fmt: skip


def _qwen3(hidden, inter, layers, heads, tied):
    return dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_act="silu",
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=32768, rms_norm_eps=1e-06, rope_theta=1000000,
        attention_bias=False, tie_word_embeddings=tied, use_sliding_window=False,
        torch_dtype="bfloat16",
    )  # fmt: skip


def _llama(hidden, inter, layers, heads, kv, vocab, max_pos, eps):
    return dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
        max_position_embeddings=max_pos, rms_norm_eps=eps, tie_word_embeddings=False,
        torch_dtype="float16",
    )  # fmt: skip


def _baichuan(hidden, inter, layers, heads, vocab, **kw):
    # Baichuan's config.json has no position or NormHead field: the release's code decides
    # (ALiBi for 13B, NormHead for Baichuan2); sfmed follows the same size rule.
    return dict(
        model_type="baichuan", architectures=["BaichuanForCausalLM"], hidden_act="silu",
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, vocab_size=vocab, model_max_length=4096, rms_norm_eps=1e-06,
        tie_word_embeddings=False, torch_dtype="bfloat16", **kw,
    )  # fmt: skip


PUBLISHED = {
    # Qwen2 / Qwen2.5 (Qwen/<name>/config.json)
    "qwen2_0_5b": _qwen2(896, 4864, 24, 14, 2, 151936, 131072, 1e-06, True),
    "qwen2_1_5b": _qwen2(1536, 8960, 28, 12, 2, 151936, 131072, 1e-06, True),
    "qwen2_7b": _qwen2(3584, 18944, 28, 28, 4, 152064, 131072, 1e-06, False),
    "qwen2_5_0_5b": _qwen2(896, 4864, 24, 14, 2, 151936, 32768, 1e-06, True),
    "qwen2_5_1_5b": _qwen2(1536, 8960, 28, 12, 2, 151936, 131072, 1e-06, True),
    "qwen2_5_7b": _qwen2(3584, 18944, 28, 28, 4, 152064, 131072, 1e-06, False),
    "qwen2_5_14b": _qwen2(5120, 13824, 48, 40, 8, 152064, 131072, 1e-05, False),
    "qwen2_5_72b": _qwen2(8192, 29568, 80, 64, 8, 152064, 131072, 1e-05, False),
    # Qwen3 base models (Qwen/Qwen3-<size>-Base/config.json)
    "qwen3_0_6b": _qwen3(1024, 3072, 28, 16, True),
    "qwen3_1_7b": _qwen3(2048, 6144, 28, 16, True),
    "qwen3_8b": _qwen3(4096, 12288, 36, 32, False),
    "qwen3_14b": _qwen3(5120, 17408, 40, 40, False),
    # LLaMA-2 (meta-llama/Llama-2-<size>-hf/config.json; no rope_theta field: 10000)
    "llama2_7b": _llama(4096, 11008, 32, 32, 32, 32000, 4096, 1e-05),
    "llama2_13b": _llama(5120, 13824, 40, 40, 40, 32000, 4096, 1e-05),
    "llama2_70b": _llama(8192, 28672, 80, 64, 8, 32000, 4096, 1e-05),
    # Chinese-LLaMA-Plus-7B merged with LLaMA-7B (LLaMA-1 7B, vocabulary 49953)
    "chinese_llama_plus_7b": _llama(4096, 11008, 32, 32, 32, 49953, 2048, 1e-06),
    # IDEA-CCNL/Ziya2-13B-Base (LLaMA-2-13B, vocabulary 39424)
    "ziya_13b": _llama(5120, 13824, 40, 40, 40, 39424, 4096, 1e-05),
    # baichuan-inc/<name>/config.json
    "baichuan2_7b": _baichuan(4096, 11008, 32, 32, 125696, max_position_embeddings=4096),
    "baichuan2_13b": _baichuan(5120, 13696, 40, 40, 125696),
    "baichuan_13b": _baichuan(5120, 13696, 40, 40, 64000),
}

_TT2 = "pytorch/torchtune torchtune/models/qwen2/_model_builders.py"
_TT25 = "pytorch/torchtune torchtune/models/qwen2_5/_model_builders.py"
_TT3 = "pytorch/torchtune torchtune/models/qwen3/_model_builders.py"
_TTL = "pytorch/torchtune torchtune/models/llama2/_model_builders.py"
_LLM_PROF = "citsjtu2020/LLM-Prof sglang/Model_Config.md"
_NONE = "unconfirmed: no citable copy of this release's config.json was found"

# preset -> the lines its YAML must carry after the description ("# source: ..." or
# "# unconfirmed: ...").
SOURCES = {
    "qwen2_0_5b": [
        "source: rwth-i6/i6_experiments users/juanola/experiments/e25_11_13_ctc/"
        "configurations/qwen2/qwen2_configs.py (a copy of the config.json: every field)"
    ],
    "qwen2_1_5b": [
        f"source: {_TT2} qwen2_1_5b (sizes, heads, vocab, eps, theta, tied)",
        "unconfirmed: max_position_embeddings 131072 (that builder follows the Instruct "
        "model's 32768)",
    ],
    "qwen2_7b": [
        f"source: {_TT2} qwen2_7b (sizes, heads, vocab, eps, theta, untied)",
        "unconfirmed: max_position_embeddings 131072 (that builder follows the Instruct "
        "model's 32768)",
    ],
    "qwen2_5_0_5b": [f"source: {_TT25} qwen2_5_0_5b (every field; base and instruct share it)"],
    "qwen2_5_1_5b": [f"source: {_TT25} qwen2_5_1_5b_base (every field)"],
    "qwen2_5_7b": [f"source: {_TT25} qwen2_5_7b_base; {_LLM_PROF} (a copy of the config.json)"],
    "qwen2_5_14b": [f"source: {_TT25} qwen2_5_14b_base; {_LLM_PROF} (a copy of the config.json)"],
    "qwen2_5_72b": [f"source: {_TT25} qwen2_5_72b_base (every field)"],
    "qwen3_0_6b": [
        f"source: {_TT3} qwen3_0_6b_base (every field; the -Base release has 32768 positions, "
        "the post-trained one 40960)"
    ],
    "qwen3_1_7b": [f"source: {_TT3} qwen3_1_7b_base (every field)"],
    "qwen3_8b": [f"source: {_TT3} qwen3_8b_base (every field)"],
    "qwen3_14b": [f"source: {_TT3} qwen3_14b_base (every field)"],
    "llama2_7b": [
        f"source: {_TTL} llama2_7b (intermediate 11008 is LLaMA's SwiGLU rule that builder "
        "computes)"
    ],
    "llama2_13b": [f"source: {_TTL} llama2_13b"],
    "llama2_70b": [f"source: {_TTL} llama2_70b"],
    "chinese_llama_plus_7b": [
        "source: ymcui/Chinese-LLaMA-Alpaca README.md (model table: vocabulary 49953); th"
        "e other fields are LLaMA-7B's, which the merge script keeps (scripts/merge_llama"
        "_with_chinese_lora.py)"
    ],
    "ziya_13b": [_NONE],
    "baichuan2_7b": [_NONE],
    "baichuan2_13b": [
        "source: inclusionAI/Ling mindie_config/atb_models/build/lib/atb_llm/models/baich"
        "uan/v2_13b/config_baichuan.py (Baichuan2-13B's config: every field)"
    ],
    "baichuan_13b": [
        "source: AlibabaPAI/FlashModels hf_models/config/baichuan-13b-base/configuration_"
        "baichuan.py (the release's BaichuanConfig defaults: every field)"
    ],
}

# The variant facts each release's own code has (not in its config.json).
BAICHUAN_VARIANTS = {
    "baichuan2_7b": ("rope", True),
    "baichuan2_13b": ("alibi", True),
    "baichuan_13b": ("alibi", False),
}


def _preset_arch(name: str):
    fields = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    return ModelConfig(**fields).arch()


def test_every_preset_is_checked():
    # tiny*: test shapes; auto: the architecture of the checkpoint a run starts from
    presets = {p.stem for p in CONF.glob("*.yaml")} - {"tiny", "auto"}
    tiny = {p for p in presets if p.startswith("tiny_")}
    assert presets - tiny == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_equals_published_config(name):
    want = dataclasses.replace(arch_from_hf_config(PUBLISHED[name]), torch_dtype="bfloat16")
    got = dataclasses.replace(_preset_arch(name), torch_dtype="bfloat16")
    assert got == want


@pytest.mark.parametrize("name", sorted(BAICHUAN_VARIANTS))
def test_baichuan_variants(name):
    arch = _preset_arch(name)
    assert (arch.position_embedding_type, arch.norm_head) == BAICHUAN_VARIANTS[name]
    tiny = _preset_arch("tiny_baichuan")
    assert (tiny.position_embedding_type, tiny.norm_head) == ("alibi", True)


def test_every_preset_names_its_source():
    assert set(SOURCES) == set(PUBLISHED)
    for name, want in SOURCES.items():
        lines = (CONF / f"{name}.yaml").read_text().splitlines()
        got = [ln.removeprefix("# ") for ln in lines[1 : 1 + len(want)]]
        assert got == want, name
