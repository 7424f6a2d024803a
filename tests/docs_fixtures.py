"""Tiny stand-ins, in the published shapes, for the inputs the docs' commands name.

``tests/test_docs_commands.py`` runs the commands of README.md and docs/*.md in a sandbox folder;
these builders write a few deterministic items per file at the paths the docs use (relative to the
sandbox): the evaluation data sets (CMMLU, C-Eval, CMB-Exam, CMExam, PLE/考研306, MLEC-QA,
huatuo26M, CMtMedQA, webMedQA, medtiku, the QiZhenGPT drug CSV, CMB-Clin), answers files for the
pairwise tasks, and raw corpora for preprocessing. The shapes follow the loaders' tests
(tests/eval/test_eval_loaders.py) and the public files' layouts.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

# A handful of questions with four options; the answer letter rotates so no single letter wins.
_MCQ = [
    ("心脏位于胸腔的哪个部位？", ["中纵隔", "上纵隔", "后纵隔", "前纵隔"]),
    ("成人正常静息心率范围是？", ["40-50次/分", "60-100次/分", "100-120次/分", "120-140次/分"]),
    ("胰岛素由哪种细胞分泌？", ["α细胞", "δ细胞", "β细胞", "PP细胞"]),
    ("缺铁性贫血的典型血象是？", ["小细胞低色素", "大细胞性", "正细胞性", "溶血性"]),
]
_ANSWERS = "ABCD"

# Open questions with reference answers (huatuo26M, CMtMedQA, webMedQA, medtiku).
_QA = [
    ("咳嗽三天，伴低热，怎么办？", "多饮水，注意休息；体温超过38.5℃或咳嗽加重请就医。"),
    ("高血压患者饮食要注意什么？", "低盐低脂饮食，控制体重，戒烟限酒，规律服药。"),
    ("孩子腹泻可以吃什么？", "补充口服补液盐，清淡饮食，避免高糖饮料。"),
]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_mcq_sets(root: Path) -> None:
    """CMMLU, C-Eval val, CMB-Exam, CMExam, PLE/考研306 JSONL and MLEC-QA, a few questions each."""
    qs = [(q, opts, _ANSWERS[i % 4]) for i, (q, opts) in enumerate(_MCQ)]
    # CMMLU: a folder of per-subject CSVs, first column the row id (unnamed header).
    for subject in ("anatomy", "clinical_knowledge"):
        _write_csv(
            root / "cmmlu" / "test" / f"{subject}.csv",
            ["", "Question", "A", "B", "C", "D", "Answer"],
            [[i, q, *o, a] for i, (q, o, a) in enumerate(qs)],
        )
    # C-Eval: <subject>_val.csv with id and explanation columns.
    _write_csv(
        root / "ceval" / "val" / "clinical_medicine_val.csv",
        ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
        [[i, q, *o, a, "见教材。"] for i, (q, o, a) in enumerate(qs)],
    )
    # CMB-Exam: a JSON array with an `option` object (five options) and exam fields.
    _write_json(
        root / "CMB-Exam" / "CMB-val" / "CMB-val-merge.json",
        [
            {
                "exam_type": "医师考试",
                "exam_class": "执业医师",
                "exam_subject": "临床执业医师",
                "question": q,
                "answer": a,
                "question_type": "单项选择题",
                "option": {**dict(zip("ABCD", o)), "E": "以上都不是"},
            }
            for q, o, a in qs
        ],
    )
    # CMExam: options in one cell separated by the two characters backslash + n, as published.
    _write_csv(
        root / "CMExam" / "data" / "test_with_annotations.csv",
        ["Question", "Options", "Answer", "Explanation", "Medical Discipline", "Competency"],
        [
            [q, "\\n".join(f"{k} {v}" for k, v in zip("ABCD", o)), a, "略", "临床医学", "医学知识"]
            for q, o, a in qs
        ],
    )
    # Generic MCQ JSONL (PLE, 考研306): options as a list, or as an object.
    for name, as_list in (("ple.jsonl", True), ("ky306.jsonl", False)):
        _write_jsonl(
            root / name,
            [
                {
                    "id": f"q{i}",
                    "question": q,
                    "options": list(o) if as_list else dict(zip("ABCD", o)),
                    "answer": a,
                    "subject": "药学" if i % 2 else "临床",
                }
                for i, (q, o, a) in enumerate(qs)
            ],
        )
    # MLEC-QA: qid / qtype / qtext / options / answer.
    _write_json(
        root / "MLEC-QA" / "Clinic_test.json",
        [
            {
                "qid": f"clinic_{i}",
                "qtype": "A1型题",
                "qtext": q,
                "options": {**dict(zip("ABCD", o)), "E": "不确定"},
                "answer": a,
            }
            for i, (q, o, a) in enumerate(qs)
        ],
    )


def _answers(ids: list[str], tag: str) -> list[dict]:
    return [{"id": i, "output": f"{tag}：建议{k}多休息，必要时就医。"} for k, i in enumerate(ids)]


def write_qa_sets(root: Path) -> None:
    """huatuo26M, CMtMedQA, webMedQA, medtiku terms, and peers' answers files for each."""
    # huatuo26M test: JSON lines with list-valued answers (ids are positions).
    _write_jsonl(root / "huatuo26M_test.json", [{"questions": q, "answers": [a]} for q, a in _QA])
    huatuo_ids = [str(i) for i in range(len(_QA))]
    for name, tag in (("ours", "我们"), ("peer", "同行"), ("huatuogpt2", "华佗")):
        _write_jsonl(root / f"{name}.jsonl", _answers(huatuo_ids, tag))
    # CMtMedQA test: history pairs, then instruction/output; every assistant turn is one item.
    cmt = [
        {"id": 0, "instruction": _QA[1][0], "output": _QA[1][1], "history": [list(_QA[0])]},
        {"id": 1, "instruction": _QA[2][0], "output": _QA[2][1], "history": []},
    ]
    _write_json(root / "CMtMedQA_test.json", cmt)
    cmt_ids = ["0-0", "0-1", "1-0"]
    _write_jsonl(root / "sfmed_cmtmedqa.jsonl", _answers(cmt_ids, "我们"))
    _write_jsonl(root / "peer_cmtmedqa.jsonl", _answers(cmt_ids, "同行"))
    # webMedQA: tab-separated qid, label, department, question, answer (label 1 = the good answer).
    web = root / "webMedQA" / "medQA.test.txt"
    web.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (q, a) in enumerate(_QA):
        rows.append(f"{i}\t1\t内科\t{q}\t{a}")
        rows.append(f"{i}\t0\t内科\t{q}\t不知道。")
    web.write_text("\n".join(rows) + "\n", encoding="utf-8")
    _write_jsonl(root / "peer_webmedqa.jsonl", _answers(huatuo_ids, "同行"))
    # medtiku terms: generic QA JSONL (question / reference).
    terms = [("什么是心悸？", "自觉心脏跳动的不适感。"), ("什么是发绀？", "皮肤黏膜呈青紫色。")]
    _write_jsonl(
        root / "medtiku_terms.jsonl",
        [{"id": f"t{i}", "question": q, "reference": a} for i, (q, a) in enumerate(terms)],
    )
    _write_jsonl(root / "peer_medtiku.jsonl", _answers(["t0", "t1"], "同行"))


def write_drug_and_consultation(root: Path) -> None:
    """QiZhenGPT's drug-indication CSV and DISC's CMB-Clin dialogues with their cases."""
    _write_csv(
        root / "药品适应症评测数据集.csv",
        ["药品名称", "适应症"],
        [["布洛芬", "发热|头痛|关节痛"], ["阿莫西林", "中耳炎|咽炎|支气管炎"]],
    )
    _write_json(
        root / "DISC-MedLLM_cmb-clin.json",
        [
            {
                "id": str(i),
                "conversation": [
                    {"role": "patient", "content": q},
                    {"role": "doctor", "content": "持续多久了？"},
                    {"role": "patient", "content": "三天。"},
                    {"role": "doctor", "content": a},
                ],
            }
            for i, (q, a) in enumerate(_QA[:2])
        ],
    )
    _write_json(
        root / "CMB-cases.json",
        [{"id": str(i), "case": f"患者{i}，男，45岁，{q}"} for i, (q, _) in enumerate(_QA[:2])],
    )


def write_raw_corpora(root: Path) -> None:
    """Raw corpora for the preprocessing commands: ChatMed-shaped and Chinese-keyed QA JSONL."""
    _write_jsonl(
        root / "data" / "raw" / "chatmed" / "part-0.json",
        [
            {
                "query": f"第{i}位患者咳嗽三天，发热，怎么办？",
                "response": f"建议多喝水，观察{i}天。",
            }
            for i in range(400)
        ],
    )
    _write_jsonl(
        root / "data" / "raw" / "qa" / "part-0.jsonl",
        [
            {"问题": f"头晕{i}天怎么办？", "回答": f"测量血压，休息{i}小时后复查。"}
            for i in range(50)
        ],
    )
    # docs/dpo.md: preference pairs in the three shapes preprocessing reads
    q, good, bad = "第{}位患者头痛，怎么办？", "建议尽快就医检查。", "忍一忍就好。"
    _write_jsonl(
        root / "data" / "raw" / "dpo" / "pairs.jsonl",
        [
            [
                {"question": q.format(i), "response_chosen": good, "response_rejected": bad},
                {"conversations": [{"from": "human", "value": q.format(i)}], "chosen": good,
                 "rejected": bad},
                {"prompt": q.format(i), "chosen": good, "rejected": bad},
            ][i % 3]
            for i in range(24)
        ],
    )  # fmt: skip


def make_brief_model(hf_dir: Path, answer: str = "A") -> None:
    """Turn the tiny random Qwen2 in ``hf_dir`` into one that answers ``answer`` and stops.

    A random tiny model generates up to ``max_new_tokens`` (512) tokens per item, which makes the
    evaluation commands slow for nothing. Here every attention and MLP output is zeroed, so the
    last hidden state is the last token's embedding: every token embeds to one direction except
    ``answer``'s, and the head maps the first direction to ``answer`` and the second to EOS.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    (ans,) = tok.encode(answer, add_special_tokens=False)
    eos = tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0
        emb[ans] = 0.0
        emb[ans, 1] = 1.0
        model.model.norm.weight.fill_(1.0)
        head.zero_()
        head[ans, 0] = 10.0
        head[eos, 1] = 10.0
    model.generation_config.eos_token_id = eos
    model.save_pretrained(hf_dir)


def judge_policy(messages: list[dict], k: int) -> str:
    """A stand-in LLM judge: four consultation scores, or a pairwise verdict that alternates."""
    system = messages[0]["content"] if messages else ""
    if system.startswith("你是一名资深"):
        return '理由：回答较完整。\n{"主动性": 4, "准确性": 3, "帮助性": 4, "语言质量": 5}'
    return "理由：两者相近。\n" + ("[[A]]" if k % 3 else "[[C]]")


def write_all(root: Path) -> None:
    """Every stand-in above, under ``root``."""
    write_mcq_sets(root)
    write_qa_sets(root)
    write_drug_and_consultation(root)
    write_raw_corpora(root)
