"""MCQ prompt presets: ``lm_eval`` is byte-identical to lm-evaluation-harness's cmmlu/ceval-valid
prompts; ``sfmed`` is the default; overrides change one part each."""

from __future__ import annotations

import pytest

from sfmed.config.eval import MCQPromptConfig
from sfmed.eval.items import Problems
from sfmed.eval.loaders.mcq import load_mcq
from sfmed.eval.prompts import candidates, mcq_text, resolve_prompt

# Options as published, with the stray spaces real CSV cells have (lm-eval does not strip them).
CMMLU = (
    ",Question,A,B,C,D,Answer\n"
    "0,壁胸膜的分部不包括 , 肋胸膜,肺胸膜,膈胸膜,胸膜顶,B\n"
    "1,属于右心房的结构是,肉柱,室上嵴,乳头肌,梳状肌,D\n"
)
CEVAL = (
    "id,question,A,B,C,D,answer,explanation\n"
    "0,下列哪项不是休克的早期表现,面色苍白,四肢湿冷,血压明显下降,脉搏细速,C,\n"
)


@pytest.fixture
def cmmlu_items(tmp_path):
    p = tmp_path / "anatomy.csv"
    p.write_text(CMMLU, "utf-8")
    return load_mcq(p, "cmmlu", Problems())


def test_lm_eval_cmmlu_prompt_is_byte_identical(cmmlu_items):
    p = resolve_prompt(MCQPromptConfig(preset="lm_eval"), "cmmlu")
    q, shot = cmmlu_items[0], cmmlu_items[1]
    # lm-evaluation-harness lm_eval/tasks/cmmlu/_generate_configs.py: description =
    #   f"以下是关于{subject_zh}的单项选择题，请直接给出正确答案的选项。\n\n"
    # lm_eval/tasks/cmmlu/_default_template_yaml: doc_to_text =
    #   "{{Question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案："
    # doc_to_choice ["A","B","C","D"], default target_delimiter " ", fewshot_delimiter "\n\n".
    zero = (
        "以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n\n"
        "壁胸膜的分部不包括\nA.  肋胸膜\nB. 肺胸膜\nC. 膈胸膜\nD. 胸膜顶\n答案："
    )
    assert mcq_text(q, [], p) == zero
    one = (
        "以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n\n"
        "属于右心房的结构是\nA. 肉柱\nB. 室上嵴\nC. 乳头肌\nD. 梳状肌\n答案： D\n\n"
        "壁胸膜的分部不包括\nA.  肋胸膜\nB. 肺胸膜\nC. 膈胸膜\nD. 胸膜顶\n答案："
    )
    assert mcq_text(q, [shot], p) == one
    assert candidates(q, p) == [("A", " A"), ("B", " B"), ("C", " C"), ("D", " D")]


def test_lm_eval_ceval_prompt_is_byte_identical(tmp_path):
    f = tmp_path / "clinical_medicine_val.csv"
    f.write_text(CEVAL, "utf-8")
    it = load_mcq(f, "ceval", Problems())[0]
    p = resolve_prompt(MCQPromptConfig(preset="lm_eval"), "ceval")
    # lm_eval/tasks/ceval/_generate_configs.py: description =
    #   f"以下是中国关于{subject_zh}的单项选择题，请选出其中的正确答案。\n\n"
    # lm_eval/tasks/ceval/_default_ceval_yaml: doc_to_text =
    #   "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案："
    assert mcq_text(it, [], p) == (
        "以下是中国关于临床医学的单项选择题，请选出其中的正确答案。\n\n"
        "下列哪项不是休克的早期表现\nA. 面色苍白\nB. 四肢湿冷\nC. 血压明显下降\nD. 脉搏细速\n答案："
    )


def test_sfmed_preset_is_the_default_and_unchanged(cmmlu_items):
    p = resolve_prompt(MCQPromptConfig(), "cmmlu")
    assert mcq_text(cmmlu_items[0], [cmmlu_items[1]], p) == (
        "以下是中国关于解剖学考试的单项选择题，请选出其中的正确答案。\n\n"
        "属于右心房的结构是\nA. 肉柱\nB. 室上嵴\nC. 乳头肌\nD. 梳状肌\n答案：D\n\n"
        "壁胸膜的分部不包括\nA. 肋胸膜\nB. 肺胸膜\nC. 膈胸膜\nD. 胸膜顶\n答案："
    )
    assert candidates(cmmlu_items[0], p)[0] == ("A", "A")


def test_prompt_overrides(cmmlu_items):
    p = resolve_prompt(
        MCQPromptConfig(
            preset="lm_eval",
            opening="请回答：",
            option_format="({letter}) {text}",
            answer_cue="正确答案是",
            target_delimiter="",
            strip=True,
            continuation="option_text",
        ),
        "cmmlu",
    )
    assert mcq_text(cmmlu_items[0], [], p) == (
        "请回答：\n\n壁胸膜的分部不包括\n(A) 肋胸膜\n(B) 肺胸膜\n(C) 膈胸膜\n(D) 胸膜顶\n正确答案是"
    )
    assert candidates(cmmlu_items[0], p)[1] == ("B", "肺胸膜")


def test_lm_eval_preset_feeds_the_prompt_raw_unless_asked():
    from sfmed.config.eval import EvalConfig, MCQConfig
    from sfmed.eval.backends import side_spec

    lm = MCQConfig(prompt=MCQPromptConfig(preset="lm_eval"))
    cfg = EvalConfig(data="d.csv", generations="g.jsonl", mcq=lm)
    assert side_spec(cfg).chat_format == "plain"
    cfg = EvalConfig(data="d.csv", generations="g.jsonl", mcq=lm, use_chat_template=True)
    assert side_spec(cfg).chat_format == "template"
    assert side_spec(EvalConfig(data="d.csv", generations="g.jsonl")).chat_format == "auto"
