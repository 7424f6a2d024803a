"""Answer extraction for multiple-choice outputs, robust to what real models write.

Handles ``答案是C``, ``正确答案：B、D``, ``C. 原发病``, ``选C``, ``C选项正确``, full-width letters,
option text without its letter, and a lone letter. Rules run from the most to the least explicit;
the first one that yields only letters of this question's options wins, and its name is recorded
so that a report can show how each answer was read.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_L = "[A-J]"
# A set of letters: "BD", "B、D", "B, D", "B和D"; never followed by another Latin letter so that
# "CT检查" or "ABO血型" are not read as answers.
_SEQ = rf"{_L}(?:[\s*]*(?:[、,，/&+;；]|和|及|与|以及)?[\s*]*{_L})*(?![A-Za-z])"
_GAP = r"[\s*'\"“”‘’]*"
_OPEN = r"[(\[【]?"

_RULES: list[tuple[str, re.Pattern]] = [
    (
        "answer_statement",
        re.compile(
            rf"(?:答案|答)(?:应该|应当|应|可能|可以)?{_GAP}(?:是|为|选|选择)?{_GAP}[:：]?"
            rf"{_GAP}(?:选项)?{_GAP}{_OPEN}{_GAP}({_SEQ})"
        ),
    ),
    (
        "choose",
        re.compile(rf"(?<!不)(?<!不应)选(?:择)?(?!项){_GAP}[:：]?{_GAP}{_OPEN}{_GAP}({_SEQ})"),
    ),
    (
        "letter_correct",
        re.compile(
            rf"(?:选项{_GAP})?({_SEQ}){_GAP}(?:选项|项)?{_GAP}(?:是|为)?{_GAP}"
            rf"(?:正确|对的|最佳|最合适|最恰当|最符合)"
        ),
    ),
]
_LEADING = re.compile(
    rf"^{_GAP}{_OPEN}{_GAP}({_SEQ}){_GAP}[)\]】]?"
    rf"(?=$|[.．、:：,，。)）]|[\u3400-\u9fff]|\s+[^A-Za-z\s])"
)
# "A patient ..." is the English article, not option A.
_LONE = re.compile(rf"(?<![A-Za-z])({_L})(?![A-Za-z])(?!\s+[a-z])")
_THINK = re.compile(r"<think>.*?</think>", re.S)
_PUNCT = re.compile(r"[\s。．.，,、:：;；!！?？\"'“”‘’()（）\[\]【】*]+")


@dataclass(frozen=True)
class Extraction:
    """The letters read from an output (None when nothing could be read) and the rule used."""

    letters: tuple[str, ...] | None
    rule: str


def normalize(text: str) -> str:
    """NFKC (full-width letters and punctuation to ASCII) and without ``<think>`` blocks."""
    return _THINK.sub("", unicodedata.normalize("NFKC", text or "")).strip()


def _letters(seq: str) -> tuple[str, ...]:
    return tuple(sorted(set(re.findall(_L, seq))))


def _valid(letters: tuple[str, ...], options: dict[str, str]) -> bool:
    return bool(letters) and all(x in options for x in letters)


def _by_option_text(text: str, options: dict[str, str], multi: bool) -> tuple[str, ...] | None:
    """Options whose text appears in the output (a longer option shadows one it contains)."""
    bare = _PUNCT.sub("", text)
    norm = {k: _PUNCT.sub("", unicodedata.normalize("NFKC", v)) for k, v in options.items()}
    exact = [k for k, v in norm.items() if v and v == bare]
    if len(exact) == 1:
        return (exact[0],)
    found = [k for k, v in norm.items() if len(v) >= 2 and v in bare]
    found = [k for k in found if not any(k != o and norm[k] in norm[o] for o in found)]
    if found and (multi or len(found) == 1):
        return tuple(sorted(found))
    return None


def extract_choice(output: str, options: dict[str, str], multi: bool = False) -> Extraction:
    """Read the chosen option letter(s) of ``output`` for a question with ``options``.

    ``multi`` allows several letters from option text matching; explicit statements such as
    ``答案是AB`` always return every letter they name (a single-answer question then scores 0).
    """
    text = normalize(output)
    if not text:
        return Extraction(None, "empty")
    for name, pat in _RULES:
        for m in pat.finditer(text):
            letters = _letters(m.group(1))
            if _valid(letters, options):
                return Extraction(letters, name)
    m = _LEADING.match(text)
    if m and _valid(_letters(m.group(1)), options):
        return Extraction(_letters(m.group(1)), "leading_letter")
    found = _by_option_text(text, options, multi)
    if found:
        return Extraction(found, "option_text")
    if not multi:
        lone = {x for x in _LONE.findall(text) if x in options}
        if len(lone) == 1:
            return Extraction((lone.pop(),), "lone_letter")
    return Extraction(None, "none")
