"""Answer extraction on a table of realistic model outputs."""

from __future__ import annotations

import pytest

from sfmed.eval.extract import extract_choice

OPTS = {"A": "原发病", "B": "继发病", "C": "并发症", "D": "后遗症"}
OPTS5 = {**OPTS, "E": "合并症"}

CASES = [
    # (output, multi, expected letters, rule)
    ("答案是C", False, ("C",), "answer_statement"),
    ("答案是Ｃ", False, ("C",), "answer_statement"),  # full-width letter
    ("Ｃ", False, ("C",), "leading_letter"),
    ("正确答案：B、D", True, ("B", "D"), "answer_statement"),
    ("正确答案为 A，C，E。", True, ("A", "C", "E"), "answer_statement"),
    ("C. 原发病", False, ("C",), "leading_letter"),
    ("C、并发症是指……", False, ("C",), "leading_letter"),
    ("（B）", False, ("B",), "leading_letter"),
    ("BD", True, ("B", "D"), "leading_letter"),
    ("选C", False, ("C",), "choose"),
    ("这道题应选择D。", False, ("D",), "choose"),
    ("B选项正确", False, ("B",), "letter_correct"),
    ("A选项错误，C选项正确。", False, ("C",), "letter_correct"),
    ("C不正确，D正确", False, ("D",), "letter_correct"),
    ("答案不是A，答案是C", False, ("C",), "answer_statement"),
    ("我认为答案应该是：**D**", False, ("D",), "answer_statement"),
    ("答案：(C)", False, ("C",), "answer_statement"),
    ("答：B", False, ("B",), "answer_statement"),
    ("本题考查原发病和继发病的区别。答案为A。", False, ("A",), "answer_statement"),
    ("<think>也许选A</think>答案是B", False, ("B",), "answer_statement"),
    ("并发症", False, ("C",), "option_text"),  # option text without the letter
    ("这种情况属于继发病。", False, ("B",), "option_text"),
    ("原发病和并发症都对", True, ("A", "C"), "option_text"),
    ("我觉得是 B 吧", False, ("B",), "lone_letter"),
    ("CT检查可见占位", False, None, "none"),  # 'CT' is not option C
    ("A patient with fever", False, None, "none"),  # English article, not option A
    ("答案是F", False, None, "none"),  # not among the options
    ("", False, None, "empty"),
    ("不知道", False, None, "none"),
]


@pytest.mark.parametrize(("output", "multi", "want", "rule"), CASES)
def test_extract_table(output, multi, want, rule):
    ex = extract_choice(output, OPTS5 if multi else OPTS, multi=multi)
    assert (ex.letters, ex.rule) == (want, rule)


def test_explicit_multi_letters_on_single_answer_question_are_kept():
    # scored as wrong by the exact set match, not silently reduced to one letter
    assert extract_choice("答案是AB", OPTS).letters == ("A", "B")


def test_longer_option_shadows_contained_one():
    opts = {"A": "糖尿病", "B": "2型糖尿病", "C": "高血压", "D": "冠心病"}
    assert extract_choice("考虑2型糖尿病", opts).letters == ("B",)
