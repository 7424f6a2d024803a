"""Exam prompts: presets that reproduce a harness's prompt strings, and their parts as settings.

A prompt is an opening line, then (k-shot) solved examples and the question, separated by blank
lines. Each question block is the question, one line per option, and the answer cue; a solved
example appends the target delimiter and its answer letter(s). In log-likelihood mode each
candidate continuation is the target delimiter + a letter (or the option's text).

Presets (``mcq.prompt.preset=``):

- ``sfmed`` (default): ``以下是中国关于{subject}考试的{kind}，请选出其中的正确答案。``, question and
  options stripped, ``答案：`` directly followed by the bare letter; Chinese names for the medical
  subjects of CMMLU/C-Eval.
- ``lm_eval``: byte-identical to EleutherAI lm-evaluation-harness's ``cmmlu_*`` and
  ``ceval-valid_*`` tasks: their opening line per benchmark (``description``), the question
  ``.strip()``-ed but the options as published, ``\\nA. {A}…\\n答案：``, target delimiter ``" "``,
  few-shot examples joined by a blank line. Other formats use the CMMLU line.
- ``opencompass``: byte-identical to OpenCompass's PPL configs ``cmmlu_ppl_8b9c76`` and
  ``ceval_ppl_578f8d`` as a base model (no meta template) sees them, scored as its
  ``PPLInferencer`` does (``scoring=sequence``: mean NLL of the whole text, lowest wins).
- ``opencompass_gen``: byte-identical to OpenCompass's ``cmmlu_gen_c13365`` and
  ``ceval_gen_5f30c7`` (base model), for ``mcq.mode=generate``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from sfmed.config.eval import MCQPromptConfig
from sfmed.eval.chat_formats import Chat
from sfmed.eval.items import MCQItem

# Chinese names of the medical subjects of CMMLU and C-Eval (the sfmed preset); other subjects
# appear as named in the data.
SFMED_SUBJECTS = {
    "anatomy": "解剖学",
    "clinical_knowledge": "临床知识",
    "college_medical_statistics": "大学医学统计",
    "college_medicine": "大学医学",
    "genetics": "遗传学",
    "human_sexuality": "人类性行为",
    "nutrition": "营养学",
    "professional_medicine": "专业医学",
    "traditional_chinese_medicine": "中医中药",
    "virology": "病毒学",
    "clinical_medicine": "临床医学",
    "basic_medicine": "基础医学",
    "physician": "医师资格",
    "veterinary_medicine": "兽医学",
}

# lm-evaluation-harness lm_eval/tasks/cmmlu/_generate_configs.py, SUBJECTS (verbatim)
LM_EVAL_CMMLU_SUBJECTS = {
    "agronomy": "农学",
    "anatomy": "解剖学",
    "ancient_chinese": "古汉语",
    "arts": "艺术学",
    "astronomy": "天文学",
    "business_ethics": "商业伦理",
    "chinese_civil_service_exam": "中国公务员考试",
    "chinese_driving_rule": "中国驾驶规则",
    "chinese_food_culture": "中国饮食文化",
    "chinese_foreign_policy": "中国外交政策",
    "chinese_history": "中国历史",
    "chinese_literature": "中国文学",
    "chinese_teacher_qualification": "中国教师资格",
    "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学",
    "college_education": "大学教育学",
    "college_engineering_hydrology": "大学工程水文学",
    "college_law": "大学法律",
    "college_mathematics": "大学数学",
    "college_medical_statistics": "大学医学统计",
    "college_medicine": "大学医学",
    "computer_science": "计算机科学",
    "computer_security": "计算机安全",
    "conceptual_physics": "概念物理学",
    "construction_project_management": "建设工程管理",
    "economics": "经济学",
    "education": "教育学",
    "electrical_engineering": "电气工程",
    "elementary_chinese": "小学语文",
    "elementary_commonsense": "小学常识",
    "elementary_information_and_technology": "小学信息技术",
    "elementary_mathematics": "初等数学",
    "ethnology": "民族学",
    "food_science": "食品科学",
    "genetics": "遗传学",
    "global_facts": "全球事实",
    "high_school_biology": "高中生物",
    "high_school_chemistry": "高中化学",
    "high_school_geography": "高中地理",
    "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理学",
    "high_school_politics": "高中政治",
    "human_sexuality": "人类性行为",
    "international_law": "国际法学",
    "journalism": "新闻学",
    "jurisprudence": "法理学",
    "legal_and_moral_basis": "法律与道德基础",
    "logical": "逻辑学",
    "machine_learning": "机器学习",
    "management": "管理学",
    "marketing": "市场营销",
    "marxist_theory": "马克思主义理论",
    "modern_chinese": "现代汉语",
    "nutrition": "营养学",
    "philosophy": "哲学",
    "professional_accounting": "专业会计",
    "professional_law": "专业法学",
    "professional_medicine": "专业医学",
    "professional_psychology": "专业心理学",
    "public_relations": "公共关系",
    "security_study": "安全研究",
    "sociology": "社会学",
    "sports_science": "体育学",
    "traditional_chinese_medicine": "中医中药",
    "virology": "病毒学",
    "world_history": "世界历史",
    "world_religions": "世界宗教",
}

# lm-evaluation-harness lm_eval/tasks/ceval/_generate_configs.py, SUBJECTS (verbatim)
LM_EVAL_CEVAL_SUBJECTS = {
    "computer_network": "计算机网络",
    "operating_system": "操作系统",
    "computer_architecture": "计算机组成",
    "college_programming": "大学编程",
    "college_physics": "大学物理",
    "college_chemistry": "大学化学",
    "advanced_mathematics": "高等数学",
    "probability_and_statistics": "概率统计",
    "discrete_mathematics": "离散数学",
    "electrical_engineer": "注册电气工程师",
    "metrology_engineer": "注册计量师",
    "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理",
    "high_school_chemistry": "高中化学",
    "high_school_biology": "高中生物",
    "middle_school_mathematics": "初中数学",
    "middle_school_biology": "初中生物",
    "middle_school_physics": "初中物理",
    "middle_school_chemistry": "初中化学",
    "veterinary_medicine": "兽医学",
    "college_economics": "大学经济学",
    "business_administration": "工商管理",
    "marxism": "马克思主义基本原理",
    "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论",
    "education_science": "教育学",
    "teacher_qualification": "教师资格",
    "high_school_politics": "高中政治",
    "high_school_geography": "高中地理",
    "middle_school_politics": "初中政治",
    "middle_school_geography": "初中地理",
    "modern_chinese_history": "近代史纲要",
    "ideological_and_moral_cultivation": "思想道德修养与法律基础",
    "logic": "逻辑学",
    "law": "法学",
    "chinese_language_and_literature": "中国语言文学",
    "art_studies": "艺术学",
    "professional_tour_guide": "导游资格",
    "legal_professional": "法律职业资格",
    "high_school_chinese": "高中语文",
    "high_school_history": "高中历史",
    "middle_school_history": "初中历史",
    "civil_servant": "公务员",
    "sports_science": "体育学",
    "plant_protection": "植物保护",
    "basic_medicine": "基础医学",
    "clinical_medicine": "临床医学",
    "urban_and_rural_planner": "注册城乡规划师",
    "accountant": "注册会计师",
    "fire_engineer": "注册消防工程师",
    "environmental_impact_assessment_engineer": "环境影响评价工程师",
    "tax_accountant": "税务师",
    "physician": "医师资格",
}


@dataclass(frozen=True)
class MCQPrompt:
    """A resolved exam prompt (preset + overrides) for one data format."""

    preset: str
    opening: str  # {subject}, {kind}
    subjects: dict[str, str]
    option_format: str  # {letter}, {text}
    answer_cue: str
    target_delimiter: str
    strip: bool
    continuation: str  # letter | option_text
    shot_separator: str = "\n\n"
    # OpenCompass-style layouts: the opening line starts every block (each solved example and
    # the question) instead of the whole prompt, and the question has a prefix ("题目：").
    opening_per_block: bool = False
    question_format: str = "{question}"
    question_separator: str | None = None  # before the question after k > 0 examples
    zero_shot_prefix: str = ""  # before the question when there are no examples
    strip_question: bool = True  # with strip=False: still strip the question (lm-eval does)
    scoring: str = "continuation"  # loglik: continuation | sequence (see candidates_score)

    def settings(self) -> dict:
        """The prompt's parts, recorded in the result JSON."""
        return {
            "preset": self.preset,
            "opening": self.opening,
            "option_format": self.option_format,
            "answer_cue": self.answer_cue,
            "target_delimiter": self.target_delimiter,
            "strip": self.strip,
            "continuation": self.continuation,
            "scoring": self.scoring,
        }


_SFMED = MCQPrompt(
    preset="sfmed",
    opening="以下是中国关于{subject}考试的{kind}，请选出其中的正确答案。",
    subjects=SFMED_SUBJECTS,
    option_format="{letter}. {text}",
    answer_cue="答案：",
    target_delimiter="",
    strip=True,
    continuation="letter",
)
_LM_EVAL = MCQPrompt(
    preset="lm_eval",
    opening="以下是关于{subject}的单项选择题，请直接给出正确答案的选项。",
    subjects=LM_EVAL_CMMLU_SUBJECTS,
    option_format="{letter}. {text}",
    answer_cue="答案：",
    target_delimiter=" ",
    strip=False,
    continuation="letter",
)

# OpenCompass 0.5.3+ (commit a5acc4bba3b658f151617a3b393602110fb7a740), base model (no meta
# template), configs opencompass/configs/datasets/cmmlu/cmmlu_ppl_8b9c76.py (what cmmlu_ppl.py
# selects), ceval/ceval_ppl_578f8d.py (ceval_ppl.py), cmmlu/cmmlu_gen_c13365.py and
# ceval/ceval_gen_5f30c7.py. Their subject mappings equal the lm-eval ones above.
# Each block is the HUMAN prompt and the BOT prompt; LMTemplateParser without a meta template
# joins the non-empty items of the PromptList with "\n" (the first item gets none, even when it
# is empty). The ice items are [shot, ice_separator, shot, ..., ice_eos_token, question]:
# - PPL configs (label-keyed template, "origin"): ice_separator = ice_eos_token = "\n", so
#   shots are joined by "\n"+"\n"+"\n", the question follows the last shot after five "\n",
#   and a 0-shot prompt starts with ice_eos "\n" + "\n".
# - gen configs (begin/round template, "meta"): both are "", so every join is one "\n", and a
#   0-shot prompt starts with "\n" (the empty ice item still sets the separator).
# CMMLU: HUMAN ends with "D. {D}", BOT is "答案是: {answer}" -> cue "答案是:" + " " + letter
# (gen: the BOT prompt with the answer blanked, "答案是: ", ends the prompt).
# C-Eval: HUMAN ends with "\n答案: ", BOT is the letter -> cue "答案: " + "\n" + letter (gen: the
# empty BOT item is skipped, the prompt ends with "答案: ").
# PromptTemplate fills the fields verbatim (safe_format): nothing is stripped.
_OPENCOMPASS = MCQPrompt(
    preset="opencompass",
    opening="以下是关于{subject}的单项选择题，请直接给出正确答案的选项。",
    subjects=LM_EVAL_CMMLU_SUBJECTS,
    option_format="{letter}. {text}",
    answer_cue="答案是:",
    target_delimiter=" ",
    strip=False,
    continuation="letter",
    shot_separator="\n\n\n",
    opening_per_block=True,
    question_format="题目：{question}",
    question_separator="\n\n\n\n\n",
    zero_shot_prefix="\n\n",
    strip_question=False,
    scoring="sequence",
)
_OPENCOMPASS_GEN = replace(
    _OPENCOMPASS,
    preset="opencompass_gen",
    answer_cue="答案是: ",
    target_delimiter="",
    shot_separator="\n",
    question_separator="\n",
    zero_shot_prefix="\n",
)
_OC_CEVAL = {
    "opening": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。",
    "subjects": LM_EVAL_CEVAL_SUBJECTS,
    "question_format": "{question}",
    "answer_cue": "答案: ",
    "target_delimiter": "\n",
}

PRESETS = {p.preset: p for p in (_SFMED, _LM_EVAL, _OPENCOMPASS, _OPENCOMPASS_GEN)}
# What a preset changes for one data format (other formats use the preset as it is).
# lm-evaluation-harness: the `description` written by cmmlu/_generate_configs.py and
# ceval/_generate_configs.py (its trailing "\n\n" is the shot separator here), and
# `doc_to_text` of cmmlu/_default_template_yaml and ceval/_default_ceval_yaml.
BY_FORMAT: dict[str, dict[str, dict]] = {
    "lm_eval": {
        "ceval": {
            "opening": "以下是中国关于{subject}的单项选择题，请选出其中的正确答案。",
            "subjects": LM_EVAL_CEVAL_SUBJECTS,
        },
    },
    "opencompass": {"ceval": _OC_CEVAL},
    "opencompass_gen": {"ceval": _OC_CEVAL},
}
# Presets whose harness feeds the prompt raw to the model unless a chat format is asked for.
RAW_PROMPT_PRESETS = frozenset({"lm_eval", "opencompass", "opencompass_gen"})


def resolve_prompt(cfg: MCQPromptConfig, data_format: str) -> MCQPrompt:
    """The preset of ``cfg`` for ``data_format`` (cmmlu, ceval, …) with ``cfg``'s overrides."""
    p = PRESETS[cfg.preset]
    p = replace(p, **BY_FORMAT.get(cfg.preset, {}).get(data_format, {}))
    over = {
        k: getattr(cfg, k)
        for k in (
            "opening",
            "option_format",
            "answer_cue",
            "target_delimiter",
            "strip",
            "continuation",
            "scoring",
        )
        if getattr(cfg, k) is not None
    }
    return replace(p, **over)


def _text(item: MCQItem, p: MCQPrompt, head: str) -> str:
    if p.strip:
        question, options = item.question, item.options
    else:
        question = item.raw_question or item.question
        if p.strip_question:  # lm-eval strips the question (`Question.strip()`), not the options
            question = question.strip()
        options = item.raw_options or item.options
    lines = [p.option_format.format(letter=k, text=v) for k, v in options.items()]
    first = [head] if p.opening_per_block else []
    body = [*first, p.question_format.format(question=question), *lines]
    return "\n".join(body) + "\n" + p.answer_cue


def _shot(item: MCQItem, p: MCQPrompt, head: str) -> str:
    return _text(item, p, head) + p.target_delimiter + "".join(item.answer)


def mcq_text(item: MCQItem, shots: list[MCQItem], p: MCQPrompt) -> str:
    """The whole prompt text: opening line, solved examples, then the question."""
    kind = "多项选择题（可能有多个正确答案）" if item.multi else "单项选择题"
    subject = p.subjects.get(item.subject, item.subject)
    head = p.opening.format(subject=subject, kind=kind)
    question = _text(item, p, head)
    blocks = [] if p.opening_per_block else [head]
    blocks += [_shot(s, p, head) for s in shots]
    blocks = [b for b in blocks if b]
    if not blocks:
        return p.zero_shot_prefix + question
    sep = p.shot_separator if p.question_separator is None else p.question_separator
    return p.shot_separator.join(blocks) + sep + question


def mcq_prompt(
    item: MCQItem, shots: list[MCQItem], p: MCQPrompt, system_prompt: str | None = None
) -> Chat:
    """The exam prompt as a one-turn chat (after an optional system prompt)."""
    chat: Chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*chat, {"role": "user", "content": mcq_text(item, shots, p)}]


def candidates(item: MCQItem, p: MCQPrompt) -> list[tuple[str, str]]:
    """``(letters, continuation)`` scored in log-likelihood mode.

    Single-answer questions: each letter (or, with ``continuation=option_text``, each option's
    text) after the target delimiter. 多选 questions: every non-empty letter set (``AB``…).
    """
    letters = list(item.options)
    if item.multi:
        sets = [
            "".join(c)
            for k in range(1, len(letters) + 1)
            for c in itertools.combinations(letters, k)
        ]
        return [(s, p.target_delimiter + s) for s in sets]
    if p.continuation == "option_text":
        return [(k, p.target_delimiter + item.options[k]) for k in letters]
    return [(k, p.target_delimiter + k) for k in letters]
