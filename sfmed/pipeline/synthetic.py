"""The tiny recipe's inputs, made on the spot: a tiny random Qwen2, a ChatML tokenizer trained
on the corpora, and small deterministic corpora that a tiny model can learn.

Everything derives from one table of (condition, symptom, drug, advice) facts, so the
pretraining text, the consultations, the preference pairs and the MCQ/QA items agree with each
other and training on one measurably helps the others. ``python -m sfmed.pipeline.synthetic
<out>`` writes them (what the ``synthetic`` stage runs); nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

FACTS = [
    ("感冒", "流鼻涕", "对乙酰氨基酚", "多喝水，注意休息"),
    ("高血压", "头晕", "氨氯地平", "低盐饮食，按时测血压"),
    ("糖尿病", "多饮多尿", "二甲双胍", "控制饮食，监测血糖"),
    ("胃炎", "胃痛", "奥美拉唑", "少吃辛辣，规律进餐"),
    ("哮喘", "气喘", "沙丁胺醇", "避免过敏原，随身带药"),
    ("失眠", "睡不着", "右佐匹克隆", "睡前少看手机，规律作息"),
    ("痛风", "关节红肿", "秋水仙碱", "少吃海鲜，多喝水"),
    ("贫血", "乏力", "硫酸亚铁", "多吃瘦肉和绿叶菜"),
]
FILES = {
    "cpt": "cpt_text.jsonl",
    "sft": "consult.jsonl",
    "pref": "preference.jsonl",
    "mcq": "mcq.jsonl",
    "qa": "qa.jsonl",
}
MARKER = "synthetic.json"


def _pretrain_docs(rng: random.Random, n: int) -> list[str]:
    docs = []
    for _ in range(n):
        c, s, d, a = rng.choice(FACTS)
        parts = [
            f"{c}的常见症状是{s}。",
            f"{c}常用的药物是{d}。",
            f"{c}患者应当{a}。",
            f"出现{s}时要考虑{c}。",
        ]
        rng.shuffle(parts)
        docs.append("".join(parts))
    return docs


def _consultations(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        c, s, d, a = rng.choice(FACTS)
        turns = [
            ("user", f"医生，我最近{s}，是怎么回事？"),
            ("assistant", f"可能是{c}。还有别的不舒服吗？"),
            ("user", "没有了，该吃什么药？"),
            ("assistant", f"可以用{d}，另外{a}。"),
        ]
        rows.append({"conversation": [{"role": r, "content": t} for r, t in turns]})
    return rows


def _preferences(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        i = rng.randrange(len(FACTS))
        c, s, d, a = FACTS[i]
        wrong = FACTS[(i + 1 + rng.randrange(len(FACTS) - 1)) % len(FACTS)][2]
        rows.append(
            {
                "question": f"{c}患者该吃什么药？",
                "response_chosen": f"{c}常用{d}，另外{a}。",
                "response_rejected": f"随便吃点{wrong}就行。",
            }
        )
    return rows


def _mcq() -> list[dict]:
    letters = "ABCD"
    rows = []
    for i, (c, _, d, _) in enumerate(FACTS):
        opts = [d] + [FACTS[(i + k) % len(FACTS)][2] for k in (1, 3, 5)]
        rot = i % 4  # the answer's position varies, so always answering A scores 25%
        opts = opts[-rot:] + opts[:-rot] if rot else opts
        rows.append(
            {
                "id": f"mcq-{i}",
                "question": f"{c}常用的药物是？",
                "options": dict(zip(letters, opts, strict=True)),
                "answer": letters[opts.index(d)],
                "subject": "临床医学",
            }
        )
    return rows


def _qa() -> list[dict]:
    return [
        {"id": f"qa-{i}", "question": f"医生，我最近{s}，是怎么回事？", "reference": f"可能是{c}。"}
        for i, (c, s, _, _) in enumerate(FACTS)
    ]


def write_corpora(out: str | Path, seed: int = 0, docs: int = 400, dialogues: int = 160,
                  pairs: int = 160) -> dict[str, Path]:  # fmt: skip
    """Write the corpora (JSONL) to ``out``; the same seed gives the same bytes."""
    rng = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "cpt": [{"text": t} for t in _pretrain_docs(rng, docs)],
        "sft": _consultations(rng, dialogues),
        "pref": _preferences(rng, pairs),
        "mcq": _mcq(),
        "qa": _qa(),
    }
    paths = {}
    for key, rows in data.items():
        paths[key] = out / FILES[key]
        paths[key].write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    return paths


def tokenizer_corpus() -> str:
    """Text the tokenizer is trained on: every phrase the corpora and the chat template use."""
    rng = random.Random(1)
    lines = _pretrain_docs(rng, 64)
    for row in _consultations(rng, 32) + [
        {"conversation": [{"content": p["question"]}, {"content": p["response_chosen"]},
                          {"content": p["response_rejected"]}]}
        for p in _preferences(rng, 32)
    ]:  # fmt: skip
        lines += [t["content"] for t in row["conversation"]]
    lines += [m["question"] + "".join(m["options"].values()) for m in _mcq()]
    lines += ["以下是中国关于临床医学考试的单项选择题，请选出其中的正确答案。答案：ABCD"]
    lines += ["system\nYou are a helpful assistant.\nuser\nassistant\n"]
    return "\n".join(lines)


def make_assets(out: str | Path, seed: int = 0) -> Path:
    """The tiny recipe's inputs in ``out`` (atomically): ``hf/`` (tiny Qwen2 + tokenizer) and
    ``corpora/``; ``synthetic.json`` lists them."""
    from sfmed.core.atomic import atomic_dir, atomic_write_text
    from sfmed.utils.tiny import make_tiny_qwen2, make_tiny_tokenizer

    out = Path(out)
    with atomic_dir(out, overwrite=True) as tmp:
        hf = make_tiny_qwen2(tmp / "hf", seed=seed)
        make_tiny_tokenizer(hf, vocab_size=600, corpus=tokenizer_corpus())
        paths = write_corpora(tmp / "corpora", seed=seed)
        atomic_write_text(
            tmp / MARKER,
            json.dumps(
                {
                    "seed": seed,
                    "hf": "hf",
                    "corpora": {k: f"corpora/{p.name}" for k, p in paths.items()},
                },
                indent=1,
            ),
        )
    return out


def main(argv: list[str]) -> int:
    """``python -m sfmed.pipeline.synthetic <out> [seed]``."""
    if len(argv) not in (1, 2):
        print("usage: python -m sfmed.pipeline.synthetic <out> [seed]", file=sys.stderr)
        return 2
    out = make_assets(argv[0], seed=int(argv[1]) if len(argv) == 2 else 0)
    print(f"synthetic: tiny Qwen2, tokenizer and corpora in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
