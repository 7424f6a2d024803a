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
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
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

    from sfmed.eval.backends import BackendError, make_backend, side_spec

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    cfg = EvalConfig(data="d.jsonl", model=str(tmp_path), backend="vllm")
    with pytest.raises(BackendError, match=r"pip install 'sfmed\[vllm\]'.*backend=hf"):
        make_backend(cfg, side_spec(cfg))


def test_openai_backend_without_key_or_url_fails_early(monkeypatch):
    from sfmed.eval.backends import BackendError, make_backend, side_spec

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    cfg = EvalConfig(data="d.jsonl", model="gpt-x", backend="openai")
    with pytest.raises(BackendError, match=r"export OPENAI_API_KEY=.*api.base_url="):
        make_backend(cfg, side_spec(cfg))


def test_model_folder_without_tokenizer_is_refused_up_front(tmp_path):
    """A model exported from random weights has no tokenizer files: refused before loading,
    saying how to add one; tokenizer= pointing at a tokenizer folder is accepted."""
    m, tok = tmp_path / "m", tmp_path / "tok"
    m.mkdir()
    tok.mkdir()
    (m / "config.json").write_text("{}")
    with pytest.raises(EvalConfigError, match=r"has no tokenizer files.*pass tokenizer=.*copy"):
        EvalConfig(data="d.jsonl", model=str(m))
    with pytest.raises(EvalConfigError, match=r"tokenizer=.* has no tokenizer files"):
        EvalConfig(data="d.jsonl", model=str(m), tokenizer=str(tok))
    (tok / "tokenizer.model").write_bytes(b"x")
    assert EvalConfig(data="d.jsonl", model=str(m), tokenizer=str(tok)).tokenizer == str(tok)
    # side B is checked too
    with pytest.raises(EvalConfigError, match=r"model_b=|has no tokenizer files"):
        EvalConfig(
            task="rouge_pairwise",
            data="d.jsonl",
            generations_a="a.jsonl",
            model_b=str(m),
        )


def test_eval_errors_are_user_errors():
    from sfmed.core.errors import ConfigError, UserError
    from sfmed.eval.backends import BackendError
    from sfmed.eval.items import DataError

    assert issubclass(EvalConfigError, ConfigError)
    assert issubclass(DataError, UserError) and issubclass(BackendError, UserError)


def test_prompt_settings_validated():
    from sfmed.config.eval import MCQPromptConfig

    with pytest.raises(EvalConfigError, match="mcq.prompt.preset='helm'"):
        MCQPromptConfig(preset="helm")
    with pytest.raises(EvalConfigError, match="must contain {letter} and {text}"):
        MCQPromptConfig(option_format="{letter}")
    with pytest.raises(EvalConfigError, match="mcq.prompt.continuation='word'"):
        MCQPromptConfig(continuation="word")
