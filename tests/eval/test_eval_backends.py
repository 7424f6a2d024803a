"""Backend decisions: a clean generation config, prompt truncation at turn boundaries, one
engine at a time (pairwise sides), and the vLLM backend's engine settings (with a fake ``vllm``
module: vLLM itself needs a CUDA machine)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import types

import pytest
from tiny_models import tiny_chat_model_fixture  # noqa: F401 (registers the fixture)

from sfmed.config.eval import DecodingConfig, EvalConfig, HFConfig, MCQConfig
from sfmed.eval.runner import run_evaluation

QA = [
    {"question": "高血压饮食注意什么？", "reference": "低盐饮食"},
    {"question": "感冒怎么办？", "reference": "多喝水，注意休息"},
]


def _qa_file(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in QA), "utf-8")
    return p


def test_greedy_generation_carries_no_invalid_flags(tiny_chat_model, tmp_path):
    """A folder whose generation_config.json samples (as Qwen2's does) must not make
    transformers warn "generation flags are not valid" on a greedy run."""
    m = tmp_path / "m"
    shutil.copytree(tiny_chat_model, m)
    gc = json.loads((m / "generation_config.json").read_text())
    gc.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    (m / "generation_config.json").write_text(json.dumps(gc))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    tlog = logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()  # transformers warns once per process
    tlog.addHandler(handler)
    try:
        r = run_evaluation(
            EvalConfig(
                task="reference_metrics",
                data=str(_qa_file(tmp_path)),
                model=str(m),
                output_dir=str(tmp_path / "o"),
                decoding=DecodingConfig(max_new_tokens=4),
            )
        )
    finally:
        tlog.removeHandler(handler)
    msgs = [rec.getMessage() for rec in records]
    assert not [x for x in msgs if "generation flags" in x], msgs
    assert r["decoding"]["temperature"] == 0.0 and r["n"] == 2


def test_over_long_prompts_lose_oldest_turns_first(tiny_chat_model):
    from transformers import AutoTokenizer

    from sfmed.eval.backends.hf import HFBackend

    b = HFBackend(tiny_chat_model, HFConfig(batch_size=2))
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    sys_msg = [{"role": "system", "content": "你是医生。"}]
    body = []
    for k in range(3):
        body += [
            {"role": "user", "content": f"第{k}轮问题" + "很长的描述" * 8},
            {"role": "assistant", "content": f"第{k}轮回答" + "详细的解释" * 8},
        ]
    body.append({"role": "user", "content": "最后的问题"})

    def n_tokens(chat):
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    full = n_tokens(sys_msg + body)
    room = 8
    # a context that fits the system prompt + the last two pairs + the question, not three
    b.max_len = n_tokens(sys_msg + body[2:]) + room
    assert full + room > b.max_len
    ids = b.fit(sys_msg + body, room)
    want = tok(
        tok.apply_chat_template(sys_msg + body[2:], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    assert ids == want  # dropped exactly one user/assistant pair, kept system + question
    assert b.truncated == {"prompts": 1, "turns_dropped": 2, "tokens_cut": 0}
    # a single question longer than the window keeps its last tokens and counts the cut
    b.max_len = 20
    ids = b.fit([{"role": "user", "content": "非常长的问题" * 30}], room)
    assert len(ids) == 12 and b.truncated["tokens_cut"] > 0
    # generation goes through and the counts are recorded
    out = b.generate([sys_msg + body], DecodingConfig(max_new_tokens=3))  # max_len 20 - 3 → cut
    assert len(out) == 1 and b.info()["truncated"]["prompts"] == 3
    # a fitting prompt is untouched
    b.max_len = 4096
    assert (
        b.fit(body[-1:], room)
        == tok(
            tok.apply_chat_template(body[-1:], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
    )
    b.close()
    b.close()  # a second close is harmless


class _FakeEngine:
    events: list = []

    def __init__(self, spec):
        self.spec = spec
        self.events.append(("load", spec.model))

    def generate(self, chats, decoding, desc=""):
        return [f"{self.spec.model}:{len(c)}" for c in chats]

    def info(self):
        return {"backend": "fake", "model": self.spec.model}

    def close(self):
        self.events.append(("close", self.spec.model))


@pytest.fixture
def fake_engines(monkeypatch):
    import sfmed.eval.backends as backends

    _FakeEngine.events = []
    monkeypatch.setattr(backends, "make_backend", lambda cfg, spec: _FakeEngine(spec))
    monkeypatch.setattr("sfmed.config.eval.check_model_folder", lambda *a, **k: None)
    return _FakeEngine.events


def test_pairwise_same_model_shares_one_engine(fake_engines, tmp_path):
    cfg = EvalConfig(
        task="rouge_pairwise",
        data=str(_qa_file(tmp_path)),
        model="/m/one",
        model_b="/m/one",
        name_a="A",
        name_b="B",
        output_dir=str(tmp_path / "o"),
    )
    run_evaluation(cfg)
    assert fake_engines == [("load", "/m/one"), ("close", "/m/one")]


def test_pairwise_two_models_one_after_the_other(fake_engines, tmp_path):
    cfg = EvalConfig(
        task="rouge_pairwise",
        data=str(_qa_file(tmp_path)),
        model="/m/one",
        model_b="/m/two",
        output_dir=str(tmp_path / "o"),
    )
    run_evaluation(cfg)
    # the first engine is shut down before the second loads: never two on one GPU
    assert fake_engines == [
        ("load", "/m/one"),
        ("close", "/m/one"),
        ("load", "/m/two"),
        ("close", "/m/two"),
    ]


def test_rouge_pairwise_markdown_names_sides_means_and_tokenizer(tmp_path):
    data = _qa_file(tmp_path)
    ga, gb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ga.write_text('{"id": "0", "output": "低盐饮食"}\n{"id": "1", "output": "多喝水"}\n', "utf-8")
    gb.write_text('{"id": "0", "output": "多运动"}\n{"id": "1", "output": ""}\n', "utf-8")
    r = run_evaluation(
        EvalConfig(
            task="rouge_pairwise",
            data=str(data),
            generations_a=str(ga),
            generations_b=str(gb),
            name_a="SFMed",
            name_b="Peer",
            output_dir=str(tmp_path / "o"),
        )
    )
    md = (tmp_path / "o" / "rouge_pairwise.md").read_text("utf-8")
    # by hand: item 0 A = reference (F1 1); item 1 "多喝水" vs "多喝水，注意休息" (8 characters,
    # the comma included): LCS 3, P = 1, R = 3/8, F1 = 2·(3/8)/(1 + 3/8) = 6/11; B scores 0
    assert r["mean_rouge_l_a"] == pytest.approx((1 + 6 / 11) / 2)
    assert "| qa | 1.0/0.0/0.0 |" in md and "SFMed vs Peer (win/tie/lose)" in md
    assert "Mean ROUGE-L F1: SFMed 0.7727, Peer 0.0000" in md and "tokenizer: char" in md


def test_accuracy_axes_start_at_zero(tmp_path):
    from sfmed.eval.report import chart_bars, value_axis

    assert value_axis([0.0, 0.0]) == (0.0, 1.0)  # not a -0.04…0.04 range
    assert value_axis([20.0, 50.0], top=100) == (0.0, 100.0)
    assert chart_bars(tmp_path / "z.png", ["a", "b"], [0.0, 0.0], "t", "acc", top=100) == (
        0.0,
        100.0,
    )
    lo, hi = chart_bars(tmp_path / "y.png", ["a"], [0.0], "t", "score")
    assert (lo, hi) == (0.0, 1.0)


# --- vLLM, with a fake module ------------------------------------------------------------


class _Logprob:
    def __init__(self, v):
        self.logprob = v


def _fake_lp(pos: int, token: int) -> float:
    return -0.01 * (pos + 1) - 0.001 * token


@pytest.fixture
def fake_vllm(monkeypatch, tiny_tokenizer_dir, tmp_path):
    """A ``vllm`` module recording how engines are built, used and shut down."""
    from transformers import AutoTokenizer

    log: dict = {"llm": [], "events": []}
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class EngineCore:
        def __init__(self, model):
            self.model = model

        def shutdown(self):
            log["events"].append(("shutdown", self.model))

    class LLM:
        def __init__(self, **kw):
            log["llm"].append(kw)
            log["events"].append(("load", kw["model"]))
            self.llm_engine = types.SimpleNamespace(
                engine_core=EngineCore(kw["model"]),
                model_config=types.SimpleNamespace(max_model_len=2048),
            )

        def get_tokenizer(self):
            return tok

        def generate(self, prompts, params, use_tqdm=True):
            log["prompts"] = prompts
            outs = []
            for p in prompts:
                ids = p["prompt_token_ids"]
                lps = [None] + [{t: _Logprob(_fake_lp(j, t))} for j, t in enumerate(ids)][1:]
                outs.append(
                    types.SimpleNamespace(
                        prompt_logprobs=lps, outputs=[types.SimpleNamespace(text=" 答案是A ")]
                    )
                )
            return outs

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams, mod.__version__ = LLM, SamplingParams, "0.11.0"
    dist = types.ModuleType("vllm.distributed")
    ps = types.ModuleType("vllm.distributed.parallel_state")
    ps.cleanup_dist_env_and_memory = lambda: log["events"].append(("cleanup",))
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.distributed", dist)
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", ps)
    folders = []
    for name in ("m1", "m2"):
        f = tmp_path / name
        shutil.copytree(tiny_tokenizer_dir, f)
        (f / "config.json").write_text("{}")
        folders.append(f)
    return log, tok, folders


def test_vllm_scoring_disables_prefix_caching_and_encodes_jointly(fake_vllm, tmp_path):
    from sfmed.eval.backends.base import encode_pair

    log, tok, (m1, _) = fake_vllm
    data = tmp_path / "anatomy.csv"
    data.write_text(",Question,A,B,C,D,Answer\n0,咽的分部,咽隐窝,口咽部,鼻咽部,喉咽部,C\n", "utf-8")
    r = run_evaluation(
        EvalConfig(
            task="mcq",
            data=str(data),
            model=str(m1),
            backend="vllm",
            output_dir=str(tmp_path / "o"),
            mcq=MCQConfig(mode="loglik"),
        )
    )
    assert log["llm"][0]["enable_prefix_caching"] is False
    assert r["sources"]["model"]["prefix_caching"] is False
    rec = r["records"][0]
    ctx = tok.apply_chat_template(rec["prompt"], tokenize=False, add_generation_prompt=True)
    for k, letter in enumerate("ABCD"):
        sent = log["prompts"][k]["prompt_token_ids"]
        c_ids, l_ids = encode_pair(tok, ctx, letter, add_special_tokens=False)
        assert sent == c_ids + l_ids
        want = sum(_fake_lp(len(c_ids) + j, t) for j, t in enumerate(l_ids))
        assert rec["logprobs"][letter] == pytest.approx(want)
    assert log["events"][-2:] == [("shutdown", str(m1)), ("cleanup",)]


def test_vllm_pairwise_shuts_down_between_models_and_reuses_one(fake_vllm, tmp_path):
    log, _, (m1, m2) = fake_vllm
    base = dict(task="rouge_pairwise", data=str(_qa_file(tmp_path)), backend="vllm")
    run_evaluation(
        EvalConfig(**base, model=str(m1), model_b=str(m2), output_dir=str(tmp_path / "a"))
    )
    assert log["events"] == [
        ("load", str(m1)),
        ("shutdown", str(m1)),
        ("cleanup",),
        ("load", str(m2)),
        ("shutdown", str(m2)),
        ("cleanup",),
    ]
    assert all(kw["enable_prefix_caching"] is True for kw in log["llm"])  # generation only
    log["events"].clear()
    run_evaluation(
        EvalConfig(**base, model=str(m1), model_b=str(m1), output_dir=str(tmp_path / "b"))
    )
    assert log["events"] == [("load", str(m1)), ("shutdown", str(m1)), ("cleanup",)]


def test_vllm_extra_floor_matches_the_backend():
    """setup.py's [vllm] extra names a release with the V1 engine API the backend uses."""
    import re

    from conftest import REPO

    text = (REPO / "setup.py").read_text("utf-8")
    m = re.search(r'"vllm": \["vllm>=([0-9.]+)', text)
    assert m and tuple(int(x) for x in m.group(1).split(".")) >= (0, 10, 2)
