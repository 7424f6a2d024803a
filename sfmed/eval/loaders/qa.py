"""Loaders for open-ended QA, drug-indication and consultation data.

QA formats: ``cmtmedqa`` (``instruction``/``output`` + ``history`` pairs; every assistant turn is
an item, given the turns before it), ``huatuo26m`` (``instruction``/``output`` or
``questions``/``answers``, strings or one-element lists), ``webmedqa`` (tab-separated rows, the
accepted answer of each question), and a generic ``jsonl`` (``id``, ``question``, ``reference``,
optional ``history``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from sfmed.eval.items import DataError, Dialogue, DrugItem, Problems, QAItem
from sfmed.eval.loaders.io import (
    JSON_SUFFIXES,
    data_files,
    own_id,
    prefixed,
    read_csv,
    read_records,
    read_text,
)

QA_FORMATS = ("cmtmedqa", "huatuo26m", "webmedqa", "jsonl")


def _text(v) -> str:
    """A field that may be a string or a (one-element) list of strings."""
    if isinstance(v, list):
        v = v[0] if v else ""
    return "" if v is None else str(v).strip()


def _history(raw, where: str) -> list[tuple[str, str]]:
    """``[[q, a], ...]`` or ``[{role, content}, ...]`` → list of (user, assistant) pairs."""
    if not raw:
        return []
    if all(isinstance(t, dict) for t in raw):
        texts = [str(t.get("content", "")) for t in raw]
        if len(texts) % 2:
            raise DataError(f"{where}: history has an odd number of messages")
        return list(zip(texts[::2], texts[1::2]))
    pairs = []
    for t in raw:
        if not isinstance(t, list | tuple) or len(t) != 2:
            raise DataError(f"{where}: history entries must be [question, answer] pairs")
        pairs.append((str(t[0]), str(t[1])))
    return pairs


def _qa(problems, where, **kw) -> QAItem | None:
    if not kw["question"]:
        problems.report(f"{where}: empty question")
        return None
    if not kw["reference"]:
        problems.report(f"{where}: empty reference answer")
        return None
    return QAItem(**kw)


def load_cmtmedqa(path: Path, files: list[Path], problems: Problems) -> list[QAItem]:
    """CMtMedQA: every assistant turn (history pairs, then instruction/output) is one item."""
    out = []
    for pos, r in enumerate(read_records(path)):
        where = f"{path} item {pos}"
        if "instruction" not in r or "output" not in r:
            raise DataError(f"{where}: missing 'instruction'/'output'; found {sorted(r)}")
        try:
            turns = _history(r.get("history"), where)
        except DataError as e:
            problems.report(str(e))
            continue
        turns.append((_text(r["instruction"]), _text(r["output"])))
        rid = own_id(r, pos)
        meta = {k: str(r[k]) for k in ("cate1", "cate2") if r.get(k)}
        for t, (q, a) in enumerate(turns):
            out.append(
                _qa(
                    problems,
                    f"{where} turn {t}",
                    id=prefixed(path, files, f"{rid}-{t}"),
                    question=q.strip(),
                    reference=a.strip(),
                    source=str(path),
                    row=pos,
                    history=turns[:t],
                    meta=dict(meta, turn=str(t)),
                )
            )
    return out


def load_huatuo26m(path: Path, files: list[Path], problems: Problems) -> list[QAItem]:
    """Huatuo-26M test: ``instruction``/``output`` (or ``questions``/``answers``), str or list."""
    out = []
    for pos, r in enumerate(read_records(path)):
        where = f"{path} item {pos}"
        qk = next((k for k in ("instruction", "questions", "question") if k in r), None)
        ak = next((k for k in ("output", "answers", "answer") if k in r), None)
        if qk is None or ak is None:
            raise DataError(
                f"{where}: needs instruction/output (or questions/answers); got {sorted(r)}"
            )
        q = _text(r[qk])
        if r.get("input"):
            q = f"{q}\n{_text(r['input'])}"
        out.append(
            _qa(
                problems,
                where,
                id=prefixed(path, files, own_id(r, pos)),
                question=q,
                reference=_text(r[ak]),
                source=str(path),
                row=pos,
            )
        )
    return out


def load_webmedqa(path: Path, files: list[Path], problems: Problems) -> list[QAItem]:
    """webMedQA tab-separated rows ``qid, label, department, question, answer`` (any order of the
    first two); only rows labelled 1 (the accepted answer) are items when a label column exists.
    """
    rows = list(csv.reader(read_text(path).splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows or min(len(r) for r in rows) < 2:
        raise DataError(f"{path}: expected tab-separated rows ending in question<TAB>answer")
    label_col = next(
        (c for c in (0, 1) if all(len(r) > 2 and r[c].strip() in ("0", "1") for r in rows)), None
    )
    id_col = {0: 1, 1: 0}.get(label_col) if label_col is not None else None
    out = []
    for pos, r in enumerate(rows):
        if label_col is not None and r[label_col].strip() != "1":
            continue
        rid = r[id_col].strip() if id_col is not None and r[id_col].strip() else str(pos)
        out.append(
            _qa(
                problems,
                f"{path} row {pos}",
                id=prefixed(path, files, rid),
                question=r[-2].strip(),
                reference=r[-1].strip(),
                source=str(path),
                row=pos,
                meta={"department": r[2].strip()} if len(r) >= 5 else {},
            )
        )
    return out


def load_qa_jsonl(path: Path, files: list[Path], problems: Problems) -> list[QAItem]:
    """Generic JSONL: ``id``?, ``question``, ``reference``, optional ``history``."""
    out = []
    for pos, r in enumerate(read_records(path)):
        where = f"{path} item {pos}"
        if "question" not in r or "reference" not in r:
            raise DataError(f"{where}: needs 'question' and 'reference'; got {sorted(r)}")
        try:
            hist = _history(r.get("history"), where)
        except DataError as e:
            problems.report(str(e))
            continue
        out.append(
            _qa(
                problems,
                where,
                id=prefixed(path, files, own_id(r, pos)),
                question=_text(r["question"]),
                reference=_text(r["reference"]),
                source=str(path),
                row=pos,
                history=hist,
            )
        )
    return out


_QA_LOADERS = {
    "cmtmedqa": (load_cmtmedqa, JSON_SUFFIXES),
    "huatuo26m": (load_huatuo26m, JSON_SUFFIXES),
    "webmedqa": (load_webmedqa, (".txt", ".tsv")),
    "jsonl": (load_qa_jsonl, JSON_SUFFIXES),
}


def detect_qa_format(path: str | Path) -> str:
    """Guess the QA format from the file suffix and the first record's keys."""
    f = data_files(path, (".txt", ".tsv", *JSON_SUFFIXES))[0]
    if f.suffix.lower() in (".txt", ".tsv"):
        return "webmedqa"
    recs = read_records(f)
    keys = set(recs[0]) if recs else set()
    if "reference" in keys:
        return "jsonl"
    if "history" in keys and "instruction" in keys:
        return "cmtmedqa"
    if keys & {"instruction", "questions"}:
        return "huatuo26m"
    raise DataError(f"cannot tell the format of {f}; pass format= one of {QA_FORMATS}")


def _check_ids(items, path) -> None:
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise DataError(f"{it.source} row {it.row}: duplicate item id {it.id!r} in {path}")
        seen.add(it.id)


def load_qa(path: str | Path, fmt: str = "auto", problems: Problems | None = None) -> list[QAItem]:
    """Load the QA items of ``path`` (file or folder) in format ``fmt``."""
    problems = problems or Problems()
    if fmt == "auto":
        fmt = detect_qa_format(path)
    if fmt not in _QA_LOADERS:
        raise DataError(f"format={fmt!r} is not a QA format; use one of {QA_FORMATS}")
    fn, suffixes = _QA_LOADERS[fmt]
    files = data_files(path, suffixes)
    items = [it for f in files for it in fn(f, files, problems) if it is not None]
    if not items:
        raise DataError(f"no usable QA items in {path} (format={fmt})")
    _check_ids(items, path)
    return items


_DRUG_KEYS = ("drug", "药品", "药品名称", "药物", "药名", "name")
_IND_KEYS = ("indications", "indication", "适应症", "适应病症", "labels", "label", "专家标注")


def load_drugs(
    path: str | Path, problems: Problems | None = None, sep: str = "|"
) -> list[DrugItem]:
    """Drug-indication data (CSV or JSON/JSONL): a drug column and ``|``-separated indications."""
    problems = problems or Problems()
    files = data_files(path, (".csv", *JSON_SUFFIXES))
    items: list[DrugItem] = []
    for f in files:
        if f.suffix.lower() == ".csv":
            recs = read_csv(f)
        else:
            recs = read_records(f)
        if not recs:
            raise DataError(f"{f} has no rows")
        dk = next((k for k in _DRUG_KEYS if k in recs[0]), None)
        ik = next((k for k in _IND_KEYS if k in recs[0]), None)
        if dk is None or ik is None:
            raise DataError(
                f"{f}: needs a drug column (one of {_DRUG_KEYS}) and an indications column "
                f"(one of {_IND_KEYS}); found {sorted(recs[0])}"
            )
        for pos, r in enumerate(recs):
            raw = r.get(ik)
            labels = raw if isinstance(raw, list) else str(raw or "").replace("｜", "|").split(sep)
            labels = list(dict.fromkeys(x.strip() for x in labels if str(x).strip()))
            drug = str(r.get(dk) or "").strip()
            if not drug or not labels:
                problems.report(f"{f} row {pos}: empty drug name or no labelled indication")
                continue
            rid = prefixed(f, files, own_id(r, pos))
            items.append(DrugItem(id=rid, drug=drug, indications=labels, source=str(f), row=pos))
    if not items:
        raise DataError(f"no usable drug rows in {path}")
    _check_ids(items, path)
    return items


_DOCTOR = {"doctor", "assistant", "gpt", "医生"}
_PATIENT = {"patient", "user", "human", "患者", "病人"}


def load_dialogues(
    path: str | Path, cases: str | Path | None = None, problems: Problems | None = None
) -> list[Dialogue]:
    """Consultations (DISC-MedLLM shape: ``conversation`` of ``{role, content}``), with the case
    text from the record's ``case`` or from a ``cases`` file (CMB-Clin: ``id``, ``case``).
    """
    problems = problems or Problems()
    case_by_id: dict[str, str] = {}
    if cases:
        for pos, r in enumerate(read_records(data_files(cases, JSON_SUFFIXES)[0])):
            case_by_id[own_id(r, pos)] = str(r.get("case") or r.get("description") or "")
    files = data_files(path, JSON_SUFFIXES)
    out: list[Dialogue] = []
    for f in files:
        for pos, r in enumerate(read_records(f)):
            where = f"{f} item {pos}"
            conv = r.get("conversation") or r.get("conversations") or r.get("messages")
            if not isinstance(conv, list) or not conv:
                raise DataError(
                    f"{where}: needs a non-empty 'conversation' list of {{role, content}}"
                )
            turns = []
            for t in conv:
                role = str(t.get("role", t.get("from", ""))).lower()
                text = str(t.get("content", t.get("value", "")))
                if role in _DOCTOR:
                    turns.append(("doctor", text))
                elif role in _PATIENT:
                    turns.append(("patient", text))
            if not any(r_ == "doctor" for r_, _ in turns):
                problems.report(f"{where}: no doctor turn")
                continue
            rid = own_id(r, pos)
            out.append(
                Dialogue(
                    id=prefixed(f, files, rid),
                    turns=turns,
                    source=str(f),
                    row=pos,
                    case=r.get("case") or case_by_id.get(rid),
                )
            )
    if not out:
        raise DataError(f"no usable dialogues in {path}")
    _check_ids(out, path)
    return out
