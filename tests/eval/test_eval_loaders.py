"""Each loader on self-made files in the published shapes, and the errors a user can cause."""

from __future__ import annotations

import json

import pytest

from sfmed.eval.items import DataError, Problems
from sfmed.eval.loaders import (
    detect_mcq_format,
    detect_qa_format,
    load_dialogues,
    load_drugs,
    load_mcq,
    load_qa,
)


def _w(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path, rows):
    return _w(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def test_cmmlu_csv_file_and_folder(tmp_path):
    text = ",Question,A,B,C,D,Answer\n0,壁胸膜的分部不包括,肋胸膜,肺胸膜,膈胸膜,胸膜顶,B\n1,咽的分部,咽隐窝,口咽部,鼻咽部,喉咽部,C\n"
    f = _w(tmp_path / "cmmlu" / "anatomy.csv", text)
    _w(tmp_path / "cmmlu" / "virology.csv", text.replace(",B\n", ",A\n"))
    items = load_mcq(f, "cmmlu")
    assert [it.id for it in items] == ["0", "1"]
    assert items[0].options == {"A": "肋胸膜", "B": "肺胸膜", "C": "膈胸膜", "D": "胸膜顶"}
    assert items[0].answer == ("B",) and items[0].subject == "anatomy" and not items[0].multi
    both = load_mcq(tmp_path / "cmmlu", "auto")
    # a folder prefixes ids with the file stem, since CMMLU restarts its row ids per file
    assert [it.id for it in both] == ["anatomy/0", "anatomy/1", "virology/0", "virology/1"]
    assert {it.subject for it in both} == {"anatomy", "virology"}
    assert detect_mcq_format(f) == "cmmlu"


def test_ceval_csv_val_and_unlabelled_test(tmp_path):
    f = _w(
        tmp_path / "clinical_medicine_val.csv",
        "id,question,A,B,C,D,answer,explanation\n"
        "0,心肌梗死最常见的症状是,胸痛,头痛,腹泻,皮疹,A,1. 胸痛\n"
        "7,二甲双胍属于,双胍类,磺脲类,胰岛素,GLP-1,A,\n",
    )
    items = load_mcq(f, "auto")
    assert [it.id for it in items] == ["0", "7"]
    assert items[0].subject == "clinical_medicine" and items[0].explanation == "1. 胸痛"
    t = _w(tmp_path / "x_test.csv", "id,question,A,B,C,D\n0,q,a,b,c,d\n")
    with pytest.raises(DataError, match="unlabelled"):
        load_mcq(t, "ceval")


def test_cmexam_options_per_line_and_multi_answer(tmp_path):
    import csv

    f = tmp_path / "cmexam_val.csv"
    with f.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Question", "Options", "Answer", "Explanation", "Medical Discipline"])
        w.writerow(
            ["属于糖尿病并发症的是", "A 视网膜病变\nB 肾病\nC 感冒\nD 骨折", "AB", "解析", "内科"]
        )
        w.writerow(["首选检查", "A. 心电图\nB、胸片\nC：CT\nD 血常规", "A", "", ""])
    items = load_mcq(f, "auto")
    assert items[0].answer == ("A", "B") and items[0].multi
    assert items[0].options["A"] == "视网膜病变" and items[0].subject == "内科"
    assert items[1].options == {"A": "心电图", "B": "胸片", "C": "CT", "D": "血常规"}
    assert items[1].subject == "cmexam" and items[1].groups == {}


def test_cmexam_published_backslash_n_separators_and_nan_answer(tmp_path):
    """The released CMExam CSV separates options with the two characters backslash + n, and
    has a row whose answer is ``nan``."""
    import csv

    f = tmp_path / "test_with_annotations.csv"
    with f.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Question", "Options", "Answer", "Explanation"])
        w.writerow(["上消化道出血的预后取决于", r"A 原发病\nB 出血部位\nC 出血量\nD 年龄", "A", ""])
        w.writerow(["哪项正确", r"A 甲\nB 乙\nC 丙", "nan", ""])
        w.writerow(["多选", r"A. 甲\nB、乙\nC 丙\nD 丁", "BD", ""])
    assert "\\n" in f.read_text("utf-8")  # the file really holds backslash-n
    p = Problems(strict=False)
    items = load_mcq(f, "auto", p)
    assert [it.row for it in items] == [0, 2]
    assert items[0].options == {"A": "原发病", "B": "出血部位", "C": "出血量", "D": "年龄"}
    assert items[1].answer == ("B", "D") and items[1].options["B"] == "乙"
    assert len(p.messages) == 1 and "row 1" in p.messages[0] and "'nan'" in p.messages[0]
    with pytest.raises(DataError, match=r"row 1: answer 'nan'.*strict=false"):
        load_mcq(f, "cmexam", Problems(strict=True))


def test_cmb_json_groups_and_empty_option(tmp_path):
    rows = [
        {
            "exam_type": "医师考试",
            "exam_class": "执业医师",
            "exam_subject": "临床执业医师",
            "question": "下列属于β受体阻滞剂的是",
            "answer": "AC",
            "question_type": "多项选择题",
            "option": {"A": "美托洛尔", "B": "硝苯地平", "C": "普萘洛尔", "D": "卡托普利", "E": ""},
            "id": 11,
        },
        {
            "exam_type": "护理考试",
            "exam_class": "护士",
            "exam_subject": "护理学",
            "question": "q2",
            "answer": "B",
            "question_type": "单项选择题",
            "option": {"A": "a", "B": "b"},
        },
    ]
    f = _w(tmp_path / "CMB-val-merge.json", json.dumps(rows, ensure_ascii=False))
    items = load_mcq(f, "auto")
    assert [it.id for it in items] == ["11", "1"]
    assert items[0].multi and items[0].answer == ("A", "C") and "E" not in items[0].options
    assert items[0].groups == {
        "exam_type": "医师考试",
        "exam_class": "执业医师",
        "question_type": "多项选择题",
    }
    assert items[1].subject == "护理学" and not items[1].multi


def test_mlecqa_and_generic_jsonl(tmp_path):
    m = [
        {
            "qid": "C-1",
            "qtype": "A1型题",
            "qtext": "题干",
            "options": {"A": "a", "B": "b", "C": "c"},
            "answer": "C",
        }
    ]
    f = _w(tmp_path / "Clinic_test.json", json.dumps(m, ensure_ascii=False))
    it = load_mcq(f, "auto")[0]
    assert (it.id, it.subject, it.groups, it.answer) == (
        "C-1",
        "Clinic",
        {"qtype": "A1型题"},
        ("C",),
    )
    g = _jsonl(
        tmp_path / "ky306.jsonl",
        [{"question": "q", "options": ["x", "y", "z"], "answer": ["A", "c"]}],
    )
    it = load_mcq(g, "jsonl")[0]
    assert it.id == "0" and it.options == {"A": "x", "B": "y", "C": "z"} and it.answer == ("A", "C")


def test_mcq_errors_name_file_and_row_or_are_counted(tmp_path):
    f = _w(tmp_path / "a.csv", ",Question,A,B,C,D,Answer\n0,q1,a,b,c,d,F\n1,q2,a,b,c,d,A\n")
    with pytest.raises(DataError, match=r"a\.csv row 0.*'F'.*strict=false"):
        load_mcq(f, "cmmlu")
    p = Problems(strict=False)
    items = load_mcq(f, "cmmlu", p)
    assert [it.id for it in items] == ["1"] and len(p.messages) == 1 and "row 0" in p.messages[0]
    bad = _w(tmp_path / "b.csv", ",Question,A,B,C,Answer\n0,q,a,b,c,A\n")
    with pytest.raises(DataError, match=r"b\.csv lacks column\(s\) \['D'\]"):
        load_mcq(bad, "cmmlu")
    with pytest.raises(DataError, match="not a multiple-choice format"):
        load_mcq(f, "cmtmedqa")
    with pytest.raises(DataError, match="does not exist"):
        load_mcq(tmp_path / "nope.csv", "cmmlu")


def test_cmtmedqa_every_assistant_turn_is_an_item(tmp_path):
    rec = {
        "instruction": "还需要做什么检查？",
        "output": "建议做胃镜。",
        "history": [["我胃疼三天了", "疼痛部位在哪里？"], ["上腹部，饭后加重", "可能是胃炎。"]],
        "cate1": "消化内科",
    }
    f = _w(tmp_path / "cmtmedqa_test.json", json.dumps([rec], ensure_ascii=False))
    items = load_qa(f, "auto")
    assert [it.id for it in items] == ["0-0", "0-1", "0-2"]
    assert items[0].history == [] and items[0].reference == "疼痛部位在哪里？"
    assert items[2].history == [
        ("我胃疼三天了", "疼痛部位在哪里？"),
        ("上腹部，饭后加重", "可能是胃炎。"),
    ]
    assert items[2].messages()[-1] == {"role": "user", "content": "还需要做什么检查？"}
    assert [m["role"] for m in items[2].messages("sys")] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert detect_qa_format(f) == "cmtmedqa"


def test_huatuo26m_webmedqa_jsonl(tmp_path):
    h = [
        {"id": "", "instruction": ["头疼怎么办"], "input": "", "output": ["多休息"]},
        {"id": "h7", "instruction": "咳嗽", "output": "多喝水"},
    ]
    f = _w(tmp_path / "huatuo26M_test.json", json.dumps(h, ensure_ascii=False))
    items = load_qa(f, "auto")
    assert [(it.id, it.question, it.reference) for it in items] == [
        ("0", "头疼怎么办", "多休息"),
        ("h7", "咳嗽", "多喝水"),
    ]
    w = _w(
        tmp_path / "medQA.test.txt",
        "q1\t1\t内科\t发烧怎么办\t物理降温\nq1\t0\t内科\t发烧怎么办\t不知道\nq2\t1\t外科\t骨折\t固定\n",
    )
    items = load_qa(w, "auto")
    assert [(it.id, it.reference, it.meta["department"]) for it in items] == [
        ("q1", "物理降温", "内科"),
        ("q2", "固定", "外科"),
    ]
    j = _jsonl(
        tmp_path / "medtiku.jsonl",
        [
            {
                "question": "什么是高血压",
                "reference": "血压升高",
                "history": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                ],
            }
        ],
    )
    it = load_qa(j, "auto")[0]
    assert it.history == [("a", "b")] and it.id == "0"


def test_qa_empty_reference_strict_and_counted(tmp_path):
    j = _jsonl(
        tmp_path / "x.jsonl",
        [{"question": "q", "reference": ""}, {"question": "q2", "reference": "r"}],
    )
    with pytest.raises(DataError, match=r"x\.jsonl item 0: empty reference"):
        load_qa(j, "jsonl")
    p = Problems(strict=False)
    assert [it.id for it in load_qa(j, "jsonl", p)] == ["1"] and len(p.messages) == 1
    with pytest.raises(DataError, match="needs 'question' and 'reference'"):
        load_qa(_jsonl(tmp_path / "y.jsonl", [{"q": 1}]), "jsonl")


def test_drug_and_dialogue_loaders(tmp_path):
    f = _w(
        tmp_path / "drugs.csv",
        "药品名称,适应病症\n阿莫西林,呼吸道感染|泌尿道感染｜皮肤软组织感染\n二甲双胍,2型糖尿病\n",
    )
    items = load_drugs(f)
    assert items[0].drug == "阿莫西林" and items[0].indications == [
        "呼吸道感染",
        "泌尿道感染",
        "皮肤软组织感染",
    ]
    with pytest.raises(DataError, match="needs a drug column"):
        load_drugs(_w(tmp_path / "bad.csv", "x,y\n1,2\n"))
    conv = [
        {
            "id": "0",
            "conversation": [
                {"role": "patient", "content": "腹痛"},
                {"role": "doctor", "content": "多久了？"},
            ],
        }
    ]
    d = _w(tmp_path / "dlg.json", json.dumps(conv, ensure_ascii=False))
    cases = _w(
        tmp_path / "cases.json", json.dumps([{"id": "0", "case": "男，49岁"}], ensure_ascii=False)
    )
    out = load_dialogues(d, cases)
    assert (
        out[0].turns == [("patient", "腹痛"), ("doctor", "多久了？")] and out[0].case == "男，49岁"
    )
