"""Small self-made corpora in the seed corpora's shapes, and helpers shared by the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

QA = [
    ("高血压患者平时饮食需要注意什么？", "低盐低脂饮食，戒烟限酒，规律运动，按时服药。"),
    ("糖尿病的典型症状有哪些？", "多饮、多食、多尿和体重下降，即三多一少。"),
    ("阿莫西林适用于哪些感染？", "敏感菌所致的呼吸道、泌尿道和皮肤软组织感染。"),
    ("心肌梗死最常见的症状是什么？", "持续性胸骨后疼痛，可放射到左肩和左臂。"),
    ("孩子发烧38.5度怎么办？", "可以按体重服用布洛芬或对乙酰氨基酚，多喝水，注意观察精神状态。"),
    (
        "What is the dose of aspirin?",
        "Aspirin 100 mg daily for secondary prevention; CT, MRI, ECG.",
    ),
]


def write_jsonl(path: Path, rows, raw_lines: dict[int, bytes] | None = None) -> Path:
    """Rows as JSON lines; ``raw_lines`` inserts raw (e.g. malformed) lines at given positions."""
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
    for pos, raw in sorted((raw_lines or {}).items()):
        lines.insert(pos, raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def qa_rows(n: int, offset: int = 0) -> list[dict]:
    """``n`` distinct question/answer records."""
    out = []
    for i in range(n):
        q, a = QA[(i + offset) % len(QA)]
        out.append({"question": f"{q}（{i + offset}）", "answer": f"{a} 病例{i + offset}。"})
    return out


def read_docs(prefix) -> list[list[int]]:
    """Every document of an indexed dataset as a list of ids (via megatron-core)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [np.asarray(ds[i]).tolist() for i in range(len(ds))]


def hf_ids(tokenizer_dir, texts: list[str], eod: int) -> list[list[int]]:
    """The reference: HF ``tokenizers`` ids of each text (no special tokens) + EOD."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    return [e.ids + [eod] for e in tok.encode_batch(texts, add_special_tokens=False)]


def check_accounting(report: dict) -> None:
    """read = kept + dropped, per source, per group and in total; documents = kept."""
    for name, s in report["sources"].items():
        assert s["records_read"] == s["records_kept"] + sum(s["dropped"].values()), name
        assert s["documents"] == s["records_kept"], name
    for scope in [*report["groups"].values(), report["total"]]:
        assert scope["records_read"] == scope["records_kept"] + sum(scope["dropped"].values())
    assert report["total"]["tokens"] == sum(s["tokens"] for s in report["sources"].values())


def expected_texts(root, sources, cfg) -> dict[str, list[str]]:
    """What each source should contain: rendered, cleaned, first occurrence only (independent of
    the pipeline's chunking, workers and resume machinery)."""
    from sfmed.data.clean import make_cleaner
    from sfmed.data.io import expand_files, read_all
    from sfmed.data.readers import (
        Malformed,
        MalformedRecord,
        read_csv,
        read_json,
        read_jsonl,
        read_text,
    )
    from sfmed.data.render import make_renderer

    seen, out = set(), {}
    for name, s in sources.items():
        texts = []
        for f in expand_files(s.files, root):
            data = read_all(f)
            if s.reader == "jsonl":
                items = read_jsonl(data, s.encoding)
            elif s.reader == "json":
                items = read_json(data, s.encoding, None)
            elif s.reader == "csv":
                items = read_csv(data, s.encoding, ",", None)
            else:
                items = read_text(data, s.encoding, s.text_mode)
            render = make_renderer(s)
            clean = (
                make_cleaner(
                    cfg.cleaning.unicode,
                    cfg.cleaning.strip_html,
                    cfg.cleaning.whitespace,
                    cfg.cleaning.min_chars,
                    cfg.cleaning.max_chars,
                )
                if cfg.clean
                else None
            )
            for _, rec, bad in items:
                if bad or isinstance(rec, Malformed):
                    continue
                try:
                    t = render(rec)
                except MalformedRecord:
                    continue
                if clean is not None:
                    t, why = clean(t)
                    if why:
                        continue
                elif not t:
                    continue
                if cfg.dedup != "none":
                    if t in seen:
                        continue
                    seen.add(t)
                texts.append(t)
        out[name] = texts
    return out
