"""Loaders for the published multiple-choice exam files: CMMLU, C-Eval, CMExam, CMB, MLEC-QA, JSONL.

Each returns :class:`MCQItem` s with the subject, the file and the row; answer letters are checked
against the options so that an unknown letter fails here, naming the file and row.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from sfmed.eval.items import DataError, MCQItem, Problems
from sfmed.eval.loaders.io import (
    JSON_SUFFIXES,
    data_files,
    own_id,
    prefixed,
    read_csv,
    read_records,
)

MCQ_FORMATS = ("cmmlu", "ceval", "cmexam", "cmb", "mlecqa", "jsonl")
_LETTERS = "ABCDEFGHIJ"
_OPTION_LINE = re.compile(r"^\s*([A-J])\s*[.．、:：)）]?\s*(.*)$")


def normalize_letters(raw, where: str) -> tuple[str, ...]:
    """``'A、C'``, ``'ac'``, ``['A','C']``, ``'Ｂ'`` → ``('A', 'C')``; DataError on anything else."""
    if isinstance(raw, list | tuple):
        raw = "".join(str(x) for x in raw)
    text = unicodedata.normalize("NFKC", str(raw or "")).upper()
    text = re.sub(r"[\s,，、;；/|和及与]+", "", text)
    if not text or not re.fullmatch(f"[{_LETTERS}]+", text):
        raise DataError(f"{where}: answer {raw!r} is not a set of option letters")
    return tuple(sorted(set(text)))


def _item(
    problems: Problems,
    where: str,
    *,
    id: str,
    question,
    options: dict,
    answer,
    subject: str,
    source: Path,
    row: int,
    groups: dict | None = None,
    explanation=None,
) -> MCQItem | None:
    """Validate one question; returns None (after reporting) when it cannot be scored."""
    raw = {
        str(k).strip().upper(): str(v)
        for k, v in options.items()
        if v is not None and str(v).strip()
    }
    opts = {k: v.strip() for k, v in raw.items()}
    if not str(question or "").strip():
        problems.report(f"{where}: empty question")
        return None
    if len(opts) < 2:
        problems.report(f"{where}: fewer than two non-empty options ({sorted(opts)})")
        return None
    try:
        letters = normalize_letters(answer, where)
    except DataError as e:
        problems.report(str(e))
        return None
    unknown = [x for x in letters if x not in opts]
    if unknown:
        problems.report(f"{where}: answer letter(s) {unknown} not among the options {sorted(opts)}")
        return None
    return MCQItem(
        id=id,
        question=str(question).strip(),
        options=dict(sorted(opts.items())),
        answer=letters,
        subject=subject,
        source=str(source),
        row=row,
        groups={k: str(v) for k, v in (groups or {}).items() if v not in (None, "")},
        explanation=str(explanation).strip() if explanation else None,
        raw_question=str(question),
        raw_options=dict(sorted(raw.items())),
    )


def _subject_from_stem(stem: str) -> str:
    return re.sub(r"[_-](val|dev|test|train|merge)$", "", stem, flags=re.I)


def load_cmmlu(path: Path, files: list[Path], problems: Problems) -> list[MCQItem]:
    """CMMLU CSV: ``,Question,A,B,C,D,Answer`` (first column the row id); subject = file stem."""
    out = []
    for pos, r in enumerate(read_csv(path, ["Question", "A", "B", "C", "D", "Answer"])):
        rid = own_id(r, pos, key="")
        it = _item(
            problems,
            f"{path} row {pos}",
            id=prefixed(path, files, rid),
            question=r["Question"],
            options={k: r[k] for k in "ABCD"},
            answer=r["Answer"],
            subject=_subject_from_stem(path.stem),
            source=path,
            row=pos,
        )
        out.append(it)
    return out


def load_ceval(path: Path, files: list[Path], problems: Problems) -> list[MCQItem]:
    """C-Eval CSV: ``id,question,A,B,C,D,answer[,explanation]``; subject = stem less ``_val``."""
    rows = read_csv(path, ["question", "A", "B", "C", "D"])
    if "answer" not in rows[0]:
        raise DataError(
            f"{path} has no 'answer' column (the C-Eval test split is unlabelled); "
            "evaluate on the val split or submit to the C-Eval leaderboard"
        )
    out = []
    for pos, r in enumerate(rows):
        out.append(
            _item(
                problems,
                f"{path} row {pos}",
                id=prefixed(path, files, own_id(r, pos)),
                question=r["question"],
                options={k: r[k] for k in "ABCD"},
                answer=r["answer"],
                subject=_subject_from_stem(path.stem),
                source=path,
                row=pos,
                explanation=r.get("explanation"),
            )
        )
    return out


def parse_option_lines(text: str, where: str) -> dict[str, str]:
    """CMExam's ``Options`` cell: one option per line, ``A 原发病`` (also ``A.``/``A、``).

    The published CMExam CSV separates the options with the two characters backslash + ``n``
    (``A 原发病\\nB 出血部位``), not with newlines; both separators are accepted.
    """
    opts: dict[str, str] = {}
    text = (text or "").replace("\\n", "\n")
    for line in unicodedata.normalize("NFKC", text).splitlines():
        if not line.strip():
            continue
        m = _OPTION_LINE.match(line)
        if not m:
            raise DataError(f"{where}: option line {line!r} does not start with a letter")
        opts[m.group(1)] = m.group(2).strip()
    return opts


def load_cmexam(path: Path, files: list[Path], problems: Problems) -> list[MCQItem]:
    """CMExam CSV: ``Question,Options,Answer,Explanation`` (+ ``Medical Discipline`` etc.)."""
    out = []
    for pos, r in enumerate(read_csv(path, ["Question", "Options", "Answer"])):
        where = f"{path} row {pos}"
        try:
            opts = parse_option_lines(r["Options"], where)
        except DataError as e:
            problems.report(str(e))
            continue
        groups = {
            "discipline": r.get("Medical Discipline"),
            "competency": r.get("Competency"),
            "difficulty": r.get("Difficulty level"),
        }
        out.append(
            _item(
                problems,
                where,
                id=prefixed(path, files, own_id(r, pos)),
                question=r["Question"],
                options=opts,
                answer=r["Answer"],
                subject=(r.get("Medical Discipline") or "").strip()
                or _subject_from_stem(path.stem),
                source=path,
                row=pos,
                groups=groups,
                explanation=r.get("Explanation"),
            )
        )
    return out


def _need(r: dict, keys: list[str], where: str) -> None:
    missing = [k for k in keys if k not in r]
    if missing:
        raise DataError(
            f"{where}: missing field(s) {missing}; found {sorted(r)} — is format= right?"
        )


def load_cmb(path: Path, files: list[Path], problems: Problems) -> list[MCQItem]:
    """CMB-Exam JSON: ``question``, ``option`` dict, ``answer``, ``question_type``, exam fields."""
    out = []
    for pos, r in enumerate(read_records(path)):
        where = f"{path} item {pos}"
        _need(r, ["question", "option", "answer"], where)
        if not isinstance(r["option"], dict):
            problems.report(f"{where}: 'option' must be an object of letter → text")
            continue
        out.append(
            _item(
                problems,
                where,
                id=prefixed(path, files, own_id(r, pos)),
                question=r["question"],
                options=r["option"],
                answer=r["answer"],
                subject=str(r.get("exam_subject") or _subject_from_stem(path.stem)),
                source=path,
                row=pos,
                groups={
                    "exam_type": r.get("exam_type"),
                    "exam_class": r.get("exam_class"),
                    "question_type": r.get("question_type"),
                },
                explanation=r.get("explanation"),
            )
        )
    return out


def load_mlecqa(path: Path, files: list[Path], problems: Problems) -> list[MCQItem]:
    """MLEC-QA JSON: ``qid``, ``qtype``, ``qtext``, ``options`` dict, ``answer``."""
    out = []
    for pos, r in enumerate(read_records(path)):
        where = f"{path} item {pos}"
        _need(r, ["qtext", "options", "answer"], where)
        out.append(
            _item(
                problems,
                where,
                id=prefixed(path, files, own_id(r, pos, key="qid")),
                question=r["qtext"],
                options=r["options"] if isinstance(r["options"], dict) else {},
                answer=r["answer"],
                subject=_subject_from_stem(path.stem),
                source=path,
                row=pos,
                groups={"qtype": r.get("qtype")},
                explanation=r.get("qexplanation") or r.get("explanation"),
            )
        )
    return out


def load_mcq_jsonl(path: Path, files: list[Path], problems: Problems) -> list[MCQItem]:
    """Generic JSONL: ``id``?, ``question``, ``options`` (dict or list), ``answer``, ``subject``?."""
    out = []
    for pos, r in enumerate(read_records(path)):
        where = f"{path} item {pos}"
        _need(r, ["question", "options", "answer"], where)
        opts = r["options"]
        if isinstance(opts, list):
            opts = dict(zip(_LETTERS, opts))
        out.append(
            _item(
                problems,
                where,
                id=prefixed(path, files, own_id(r, pos)),
                question=r["question"],
                options=opts if isinstance(opts, dict) else {},
                answer=r["answer"],
                subject=str(r.get("subject") or _subject_from_stem(path.stem)),
                source=path,
                row=pos,
                groups={"question_type": r.get("question_type")},
                explanation=r.get("explanation"),
            )
        )
    return out


_LOADERS = {
    "cmmlu": (load_cmmlu, (".csv",)),
    "ceval": (load_ceval, (".csv",)),
    "cmexam": (load_cmexam, (".csv",)),
    "cmb": (load_cmb, JSON_SUFFIXES),
    "mlecqa": (load_mlecqa, JSON_SUFFIXES),
    "jsonl": (load_mcq_jsonl, JSON_SUFFIXES),
}


def detect_mcq_format(path: str | Path) -> str:
    """Guess the MCQ format from the first file's header or first record's keys."""
    f = data_files(path, (".csv", *JSON_SUFFIXES))[0]
    if f.suffix.lower() == ".csv":
        header = f.read_text(encoding="utf-8-sig").splitlines()[0].split(",")
        if "Options" in header:
            return "cmexam"
        if "Question" in header:
            return "cmmlu"
        if "question" in header:
            return "ceval"
    else:
        recs = read_records(f)
        keys = set(recs[0]) if recs else set()
        if "qtext" in keys:
            return "mlecqa"
        if "option" in keys:
            return "cmb"
        if "options" in keys:
            return "jsonl"
    raise DataError(f"cannot tell the format of {f}; pass format= one of {MCQ_FORMATS}")


def load_mcq(
    path: str | Path, fmt: str = "auto", problems: Problems | None = None
) -> list[MCQItem]:
    """Load every question of ``path`` (a file or a folder of files) in format ``fmt``."""
    problems = problems or Problems()
    if fmt == "auto":
        fmt = detect_mcq_format(path)
    if fmt not in _LOADERS:
        raise DataError(f"format={fmt!r} is not a multiple-choice format; use one of {MCQ_FORMATS}")
    fn, suffixes = _LOADERS[fmt]
    files = data_files(path, suffixes)
    items = [it for f in files for it in fn(f, files, problems) if it is not None]
    if not items:
        raise DataError(f"no usable questions in {path} (format={fmt})")
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise DataError(f"{it.source} row {it.row}: duplicate question id {it.id!r}")
        seen.add(it.id)
    return items
