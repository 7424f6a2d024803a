"""Judge logic (position swap, ties, malformed replies) against a fake OpenAI-compatible server."""

from __future__ import annotations

import json
import re

import pytest
from fake_openai_server import FakeOpenAI

from sfmed.config.eval import APIConfig, EvalConfig, JudgeConfig
from sfmed.eval.items import QAItem
from sfmed.eval.judge import Judge, combine_orders, parse_scores, parse_verdict
from sfmed.eval.runner import run_evaluation


def _answers(messages):
    """The two answers shown to the judge, in display order (A, B)."""
    user = messages[1]["content"]
    a = re.search(r"\[助手A的回答\]\n(.*?)\n\n\[助手B的回答\]", user, re.S).group(1)
    b = user.split("[助手B的回答]\n", 1)[1]
    return a, b


def fair_judge(messages, k):
    """Prefers the answer containing 好; equal when both or neither do."""
    a, b = _answers(messages)
    if ("好" in a) == ("好" in b):
        return "两者相当。\n[[C]]"
    return "理由……\n[[A]]" if "好" in a else "理由……\n[[B]]"


def _judge(url, **kw):
    return Judge(JudgeConfig(base_url=url, model="fake-judge", timeout=10, max_retries=0, **kw))


def _item(i=0):
    return QAItem(id=str(i), question="头疼怎么办", reference="休息", source="x", row=i)


def test_verdict_parsing_and_order_combination():
    assert parse_verdict("分析……[[A]]") == "first"
    assert parse_verdict("先说[[A]]，最终[[B]]") == "second"  # the last verdict counts
    assert parse_verdict("［［C］］") == "tie"
    assert parse_verdict("A更好") is None
    assert combine_orders("first", "second") == "win"
    assert combine_orders("second", "first") == "lose"
    assert combine_orders("first", "first") == "tie"  # position bias: orders disagree
    assert combine_orders(None, "second") == "tie"
    assert parse_scores('{"主动性": 3, "准确性": 4, "帮助性": 5, "语言质量": 2}') == {
        "proactivity": 3,
        "accuracy": 4,
        "helpfulness": 5,
        "linguistic_quality": 2,
    }
    assert parse_scores('{"主动性": 3, "准确性": 4}') is None


def test_pair_swaps_positions_and_agreement_wins():
    with FakeOpenAI(fair_judge) as srv:
        j = _judge(srv.base_url)
        assert j.pair(_item(), "好的回答", "一般")["outcome"] == "win"
        assert j.pair(_item(), "一般", "好的回答")["outcome"] == "lose"
        assert j.pair(_item(), "好", "好")["outcome"] == "tie"
        # each pair asked twice, the second time with the answers swapped
        shown = [_answers(r["messages"]) for r in srv.requests[:2]]
        assert shown == [("好的回答", "一般"), ("一般", "好的回答")]
        assert all(r["temperature"] == 0.0 and r["seed"] == 1234 for r in srv.requests)


def test_position_biased_judge_gives_ties():
    with FakeOpenAI(lambda m, k: "[[A]]") as srv:
        r = _judge(srv.base_url).pair(_item(), "好", "差")
    assert (r["outcome"], r["verdict_ab"], r["verdict_ba"]) == ("tie", "first", "first")


def test_malformed_reply_is_retried_with_reminder_then_counted():
    def flaky(messages, k):
        # first answer of every conversation is malformed; the reminder fixes it
        return "[[A]]" if messages[-1]["content"].startswith("请在最后一行") else "我觉得A好"

    with FakeOpenAI(flaky) as srv:
        r = _judge(srv.base_url, format_retries=1).pair(_item(), "x", "y")
        assert r["verdict_ab"] == "first" and len(r["judge_replies_ab"]) == 2
        assert srv.requests[1]["messages"][-2] == {"role": "assistant", "content": "我觉得A好"}
    with FakeOpenAI(lambda m, k: "无法判断") as srv:
        r = _judge(srv.base_url, format_retries=2).pair(_item(), "x", "y")
        assert (r["outcome"], r["malformed"]) == ("tie", 2)
        assert len(srv.requests) == 6  # 2 orders × (1 + 2 retries)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return str(path)


def test_judge_pairwise_task_end_to_end(tmp_path):
    data = _jsonl(
        tmp_path / "qa.jsonl", [{"question": f"问题{i}", "reference": "参考"} for i in range(6)]
    )
    # A better on 0-2, equal on 3-4, B better on 5
    ga = _jsonl(
        tmp_path / "a.jsonl", [{"id": str(i), "output": "好" if i < 5 else "差"} for i in range(6)]
    )
    gb = _jsonl(
        tmp_path / "b.jsonl", [{"id": str(i), "output": "差" if i < 3 else "好"} for i in range(6)]
    )
    with FakeOpenAI(fair_judge) as srv:
        cfg = EvalConfig(
            task="judge_pairwise",
            data=data,
            generations_a=ga,
            generations_b=gb,
            output_dir=str(tmp_path / "out"),
            judge=JudgeConfig(
                base_url=srv.base_url, model="fake-judge", max_retries=0, concurrency=3
            ),
        )
        r = run_evaluation(cfg)
        assert len(srv.requests) == 12
    assert (r["win"], r["tie"], r["lose"], r["n"]) == (
        0.5,
        pytest.approx(2 / 6),
        pytest.approx(1 / 6),
        6,
    )
    assert r["win"] + r["tie"] + r["lose"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "out" / "judge_pairwise.json").read_text("utf-8"))
    assert [x["outcome"] for x in saved["records"]] == ["win"] * 3 + ["tie"] * 2 + ["lose"]
    assert saved["settings"]["judge"]["model"] == "fake-judge" and "api_key" not in json.dumps(
        saved
    )
    assert "a vs b (win/tie/lose)" in (tmp_path / "out" / "judge_pairwise.md").read_text("utf-8")
    assert (tmp_path / "out" / "judge_pairwise.png").read_bytes()[:4] == b"\x89PNG"


def test_consultation_and_openai_backend(tmp_path):
    conv = [
        {
            "id": "0",
            "conversation": [
                {"role": "patient", "content": "腹痛"},
                {"role": "doctor", "content": "多久了？"},
                {"role": "patient", "content": "三小时"},
                {"role": "doctor", "content": "去急诊"},
            ],
        },
    ]
    data = tmp_path / "dlg.json"
    data.write_text(json.dumps(conv, ensure_ascii=False), "utf-8")

    def policy(messages, k):
        if messages[0]["content"].startswith("你是一名资深"):  # the judge
            return '理由……\n{"主动性": 4, "准确性": 3, "帮助性": 4, "语言质量": 5}'
        return f"医生回复{len(messages)}"  # the model under test (openai backend)

    with FakeOpenAI(policy) as srv:
        judge = JudgeConfig(base_url=srv.base_url, model="fake-judge", max_retries=0)
        r = run_evaluation(
            EvalConfig(
                task="consultation", data=str(data), judge=judge, output_dir=str(tmp_path / "rec")
            )
        )
        assert (r["proactivity"], r["accuracy"], r["average"], r["n"]) == (4, 3, 4.0, 1)
        r = run_evaluation(
            EvalConfig(
                task="consultation",
                data=str(data),
                judge=judge,
                backend="openai",
                model="served-model",
                api=APIConfig(base_url=srv.base_url, max_retries=0),
                output_dir=str(tmp_path / "gen"),
            )
        )
        # each doctor turn answered given the recorded conversation before it
        assert r["records"][0]["doctor_turns"] == ["医生回复1", "医生回复3"]
        judged = srv.requests[-1]["messages"][1]["content"]
        assert "医生：医生回复1" in judged and "患者：三小时" in judged
    gens = (tmp_path / "gen" / "consultation.generations.jsonl").read_text("utf-8").splitlines()
    assert [json.loads(x)["id"] for x in gens] == ["0-0", "0-1"]
