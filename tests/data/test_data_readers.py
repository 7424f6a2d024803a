"""Readers (formats, encodings, compression, malformed input) and renderers (corpus shapes)."""

from __future__ import annotations

import gzip
import json

import pytest

from sfmed.config.data import ReaderOptions
from sfmed.data.io import expand_files, plan_chunks, read_chunk, stream_chunks
from sfmed.data.readers import (
    Malformed,
    MalformedRecord,
    read_csv,
    read_json,
    read_jsonl,
    read_parquet,
    read_text,
)
from sfmed.data.render import make_renderer


def _recs(items):
    return [(loc, rec, bad) for loc, rec, bad in items]


def test_text_modes_and_bom():
    data = "\ufeff第一段第一行\n第一段第二行\n\n  \n第二段\r\n".encode()
    (whole,) = _recs(read_text(data, "utf-8", "file"))
    assert whole == (1, "第一段第一行\n第一段第二行\n\n  \n第二段\r\n", 0)
    paras = _recs(read_text(data[3:], "utf-8", "paragraph"))
    assert [(loc, t) for loc, t, _ in paras] == [(1, "第一段第一行\n第一段第二行"), (5, "第二段")]
    lines = _recs(read_text(data[3:], "utf-8", "line"))
    assert [(loc, t) for loc, t, _ in lines] == [
        (1, "第一段第一行"),
        (2, "第一段第二行"),
        (4, "  "),
        (5, "第二段"),
    ]


def test_gb18030_and_invalid_bytes():
    text = "患者男性，45岁，发热咳嗽三天。\n阿莫西林胶囊0.5g"
    good = list(read_text(text.encode("gb18030"), "gb18030", "line"))
    assert [t for _, t, _ in good] == text.split("\n")
    assert all(bad == 0 for *_, bad in good)
    # The same bytes read as UTF-8 are invalid: counted, replaced by U+FFFD.
    wrong = list(read_text(text.encode("gb18030"), "utf-8", "line"))
    assert all(bad > 0 for *_, bad in wrong)
    assert "\ufffd" in wrong[0][1]


def test_jsonl_malformed_blank_and_list_fields():
    data = (
        b'{"instruction": ["\xe9\x97\xae"], "output": ["a"]}\n'
        b"\n"
        b'{"instruction": "broken\n'
        b'{"text": "x\xff y"}\n'
    )
    items = _recs(read_jsonl(data, "utf-8"))
    assert [loc for loc, *_ in items] == [1, 3, 4]
    assert items[0][1] == {"instruction": ["问"], "output": ["a"]}
    assert isinstance(items[1][1], Malformed) and "invalid JSON" in items[1][1].msg
    assert items[2][1] == {"text": "x\ufffd y"} and items[2][2] == 1


def test_json_array_object_and_lines():
    arr = json.dumps([{"a": 1}, {"a": 2}]).encode()
    assert [loc for loc, *_ in read_json(arr, "utf-8", None)] == ["#1", "#2"]
    obj = json.dumps({"data": {"rows": [{"a": 1}]}}).encode()
    assert [r for _, r, _ in read_json(obj, "utf-8", "data.rows")] == [{"a": 1}]
    missing = list(read_json(obj, "utf-8", "nope"))
    assert isinstance(missing[0][1], Malformed)
    lines = b'{"a": 1}\n{"a": 2}\nnot json\n'  # JSON lines in a .json file (MedicalGPT, Huatuo)
    items = list(read_json(lines, "utf-8", None))
    assert [r for _, r, _ in items[:2]] == [{"a": 1}, {"a": 2}]
    assert isinstance(items[2][1], Malformed) and items[2][0] == 3


def test_csv_header_multiline_and_wrong_width():
    data = (
        "department,title,ask,answer\n"
        '内科,头痛,"头痛三天,\n伴恶心",建议就诊\n'
        "外科,only three,fields\n"
        "儿科,发烧,孩子发烧,多喝水\n"
    ).encode("gb18030")
    items = _recs(read_csv(data, "gb18030", ",", None))
    assert items[0][0] == 2 and items[0][1]["ask"] == "头痛三天,\n伴恶心"
    assert isinstance(items[1][1], Malformed) and items[1][0] == 4
    assert items[2] == (
        5,
        {"department": "儿科", "title": "发烧", "ask": "孩子发烧", "answer": "多喝水"},
        0,
    )
    tsv = b"q\ta\n"
    assert _recs(read_csv(tsv, "utf-8", "\t", ["question", "answer"])) == [
        (1, {"question": "q", "answer": "a"}, 0)
    ]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["甲", "乙", None], "n": [1, 2, 3]}), p, row_group_size=2)
    rows = list(read_parquet(str(p), 0, ["text"])) + list(read_parquet(str(p), 1, None))
    assert [(loc, r.get("text")) for loc, r, _ in rows] == [
        ("row 1", "甲"),
        ("row 2", "乙"),
        ("row 3", None),
    ]


def test_chunks_compressed_and_globs(tmp_path):
    raw = b"".join(b'{"text": "%d"}\n' % i for i in range(5000))
    f = tmp_path / "a.jsonl"
    f.write_bytes(raw)
    chunks = plan_chunks(f, 4096, b"\n")
    assert len(chunks) > 5 and b"".join(read_chunk(c) for c in chunks) == raw
    assert all(read_chunk(c).endswith(b"\n") for c in chunks)
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(raw))
    import zstandard

    zs = tmp_path / "c.jsonl.zst"
    zs.write_bytes(zstandard.ZstdCompressor().compress(raw))
    for path, comp in ((gz, "gzip"), (zs, "zstd")):
        parts = list(stream_chunks(path, comp, 4096, b"\n"))
        assert len(parts) > 5 and b"".join(c.data for c in parts) == raw
    assert expand_files(["*.jsonl*"], tmp_path) == sorted([f, gz, zs])
    with pytest.raises(ValueError, match="matches no files"):
        expand_files(["*.csv"], tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        expand_files(["nope.jsonl"], tmp_path)


def _render(rec, **kw):
    return make_renderer(ReaderOptions(**kw))(rec)


def test_render_field_template_and_list_values():
    assert _render({"text": "t"}) == "t"
    assert _render({"a": {"b": ["x", "y"]}}, text_field="a.b") == "x\ny"
    with pytest.raises(MalformedRecord, match="missing field 'text'"):
        _render({"content": "c"})
    huatuo = {"instruction": ["问题"], "input": "", "output": ["回答"]}
    tpl = ["问：{instruction}", "{input}", "答：{output}"]
    assert _render(huatuo, render="template", template=tpl) == "问：问题\n答：回答"
    assert (
        _render(huatuo | {"input": "补充"}, render="template", template=tpl)
        == "问：问题\n补充\n答：回答"
    )
    with pytest.raises(MalformedRecord, match="missing field 'output'"):
        _render({"instruction": "q", "input": ""}, render="template", template=tpl)
    kg = {"questions": [["Q1", "Q1'"]], "answers": ["A1"]}
    out = _render(
        kg,
        render="template",
        template="问：{q}\n答：{a}",
        fields={"q": "questions.0.0", "a": "answers"},
    )
    assert out == "问：Q1\n答：A1"
    assert _render({"q": "", "a": ""}, render="template", template="{q}{a}") == ""
    with pytest.raises(MalformedRecord, match="not text"):
        _render({"q": {"x": 1}, "a": "b"}, render="template", template="{q}{a}")
    assert _render(["病人：咳嗽", "医生：多喝水"]) == "病人：咳嗽\n医生：多喝水"


def test_render_multiturn_history_and_dialogues():
    cmt = {
        "instruction": "那需要做胃镜吗？",
        "input": "",
        "output": "先查幽门螺杆菌。",
        "history": [["胃胀痛怎么回事？", "可能是胃炎。"], ["吃什么药？", "可用抑酸药。"]],
    }
    assert _render(cmt, render="history") == (
        "问：胃胀痛怎么回事？\n答：可能是胃炎。\n问：吃什么药？\n答：可用抑酸药。\n"
        "问：那需要做胃镜吗？\n答：先查幽门螺杆菌。"
    )
    assert (
        _render(cmt | {"history": []}, render="history")
        == "问：那需要做胃镜吗？\n答：先查幽门螺杆菌。"
    )
    with pytest.raises(MalformedRecord, match="question, answer"):
        _render(cmt | {"history": [["only one"]]}, render="history")
    disc = {
        "conversation": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    }
    assert _render(disc, render="dialogue") == "问：Q\n答：A"
    share = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"},
        ]
    }
    assert _render(share, render="dialogue", roles={"system": None}) == "问：Q\n答：A"
    assert (
        _render(
            share,
            render="dialogue",
            fields={"messages": "conversations", "role": "from", "content": "value"},
            roles={"human": "User: ", "gpt": "Bot: "},
        )
        == "S\nUser: Q\nBot: A"
    )
    with pytest.raises(MalformedRecord, match="unknown role 'nurse'"):
        _render({"messages": [{"role": "nurse", "content": "x"}]}, render="dialogue")
    with pytest.raises(MalformedRecord, match="missing field"):
        _render({"turns": []}, render="dialogue")


def test_render_mcq_option_layouts():
    base = {"question": "心梗最常见症状", "answer": "A", "explanation": "胸痛为主。"}
    want = "心梗最常见症状\nA. 胸痛\nB. 头痛\n答案：A\n解析：胸痛为主。"
    assert _render(base | {"options": {"A": "胸痛", "B": "头痛"}}, render="mcq") == want
    assert _render(base | {"options": ["胸痛", "头痛"]}, render="mcq") == want
    lst = [{"key": "A", "value": "胸痛"}, {"key": "B", "value": "头痛"}]
    assert _render(base | {"options": lst}, render="mcq") == want
    cmexam = {"Question": "Q", "Options": "A 甲\nB 乙", "Answer": "B"}
    fields = {
        "question": "Question",
        "options": "Options",
        "answer": "Answer",
        "explanation": "Explanation",
    }
    assert _render(cmexam, render="mcq", fields=fields) == "Q\nA 甲\nB 乙\n答案：B"
    cmmlu = {"": "0", "Question": "Q", "A": "甲", "B": "乙", "C": "丙", "D": "丁", "Answer": "C"}
    out = _render(cmmlu, render="mcq", option_keys=["A", "B", "C", "D"], fields=fields)
    assert out == "Q\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：C"
    with pytest.raises(MalformedRecord, match="missing field 'answer'"):
        _render({"question": "Q", "options": ["x"]}, render="mcq")


def test_long_csv_fields_and_json_lines_with_a_broken_first_line():
    data = b"a,b\n1," + b"x" * 200_000 + b"\n3,4\n"
    rows = [r for _, r, _ in read_csv(data, "utf-8", ",", None)]
    assert len(rows[0]["b"]) == 200_000 and rows[1] == {"a": "3", "b": "4"}
    items = list(read_json(b'{"a": 1\n{"a": 2}\n{"a": 3}\n', "utf-8", None))
    assert isinstance(items[0][1], Malformed) and [r for _, r, _ in items[1:]] == [
        {"a": 2},
        {"a": 3},
    ]
