"""The evaluate schema: YAML composes against it, bad values fail early naming the value."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from sfmed.config.eval import EvalConfig, EvalConfigError, JudgeConfig, register


def test_yaml_composes_against_schema(tmp_path):
    register()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with initialize_config_dir(str(REPO / "conf" / "eval"), version_base="1.3"):
        dcfg = compose(
            "evaluate",
            overrides=[
                f"model={tmp_path / 'm'}",
                "data=x.csv",
                "mcq.shots=0",
                "backend=transformers",
            ],
        )
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, EvalConfig) and cfg.backend == "hf" and cfg.task == "mcq"
    assert cfg.output_dir == "outputs/eval/mcq" and cfg.decoding.temperature == 0.0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"task": "bleu"}, "task='bleu' is not one of"),
        ({"data": None}, "needs data="),
        ({"backend": "tgi"}, "backend='tgi'"),
        ({}, "needs model=<hf folder> or generations="),
        ({"generations": "g", "model": "m"}, "either model="),
        ({"task": "rouge_pairwise", "generations_a": "a"}, "side B needs exactly one"),
        ({"task": "rouge_pairwise", "generations": "a"}, "generations_a=/generations_b="),
        ({"task": "judge_pairwise", "generations_a": "a", "generations_b": "b"}, "judge.model="),
        ({"generations": "g", "mcq": {"mode": "loglik"}}, "loglik scores option letters"),
        ({"model": "/no/such/dir"}, "not a Hugging Face model folder"),
        ({"generations": "g", "limit": 0}, "limit=0"),
    ],
)
def test_bad_settings_fail_early(kw, match):
    from sfmed.config.eval import MCQConfig

    if "mcq" in kw:
        kw = {**kw, "mcq": MCQConfig(**kw["mcq"])}
    with pytest.raises(EvalConfigError, match=match):
        EvalConfig(**{"data": "d.jsonl", **kw})


def test_nested_values_validated():
    from sfmed.config.eval import DecodingConfig, MCQConfig, TextMetricConfig

    with pytest.raises(EvalConfigError, match="temperature=-1"):
        DecodingConfig(temperature=-1)
    with pytest.raises(EvalConfigError, match="needs mcq.dev_data"):
        MCQConfig(shots=5)
    with pytest.raises(EvalConfigError, match="metric.tokenizer='bpe'"):
        TextMetricConfig(tokenizer="bpe")
    assert JudgeConfig().format_retries == 2


def test_vllm_backend_missing_gives_clear_error(tmp_path):
    import importlib.util

    from sfmed.eval.backends import BackendError, make_backend

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed")
    (tmp_path / "config.json").write_text("{}")
    cfg = EvalConfig(data="d.jsonl", model=str(tmp_path), backend="vllm")
    with pytest.raises(BackendError, match=r"pip install 'sfmed\[vllm\]'.*backend=hf"):
        make_backend(cfg, cfg.model)


def test_openai_backend_without_key_or_url_fails_early(monkeypatch):
    from sfmed.eval.backends import BackendError, make_backend

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    cfg = EvalConfig(data="d.jsonl", model="gpt-x", backend="openai")
    with pytest.raises(BackendError, match=r"export OPENAI_API_KEY=.*api.base_url="):
        make_backend(cfg, cfg.model)
