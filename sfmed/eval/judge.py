"""LLM-as-judge through an OpenAI-compatible endpoint: pairwise verdicts and consultation scores.

The rubrics are fixed Chinese texts (a change to them changes every score, so they are part of
the code and recorded by hash in the result). Each pair is judged twice with the answers' positions
swapped; A wins only when both orders agree, otherwise it is a tie. A reply without a readable
verdict is re-asked with a short format reminder ``format_retries`` times, then counted as
malformed (its pair becomes a tie, and the number is reported).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from sfmed.config.eval import JudgeConfig
from sfmed.eval.backends.base import Chat
from sfmed.eval.backends.openai_api import make_client
from sfmed.eval.items import Dialogue, QAItem

logger = logging.getLogger(__name__)

PAIRWISE_RUBRIC = (
    "你是一名资深的临床医学专家，负责公正地评审两位AI医生助手对同一患者问题的回答。\n"
    "请依据以下标准进行比较：\n"
    "1. 医学准确性：诊断分析、医学解释和治疗建议是否科学正确，有无错误或可能造成伤害的内容；"
    "如提供了参考答案，可将其作为判断依据，但不要求措辞一致；\n"
    "2. 有用性：是否切实回应了患者的问题，给出清晰、可操作的建议，必要时提醒及时就医；\n"
    "3. 完整性：是否覆盖了回答该问题所需的关键要点，结合了对话历史中的信息；\n"
    "4. 表达质量：是否条理清楚、语言通顺，语气专业且有同理心。\n"
    "请不要因为回答出现的先后顺序、篇幅长短或助手名称而产生偏见。\n"
    "先用几句话简要说明理由，然后在最后一行只输出最终结论：“[[A]]”表示助手A的回答更好，"
    "“[[B]]”表示助手B的回答更好，“[[C]]”表示两者水平相当。"
)
PAIRWISE_REMINDER = "请在最后一行只输出最终结论：[[A]]、[[B]] 或 [[C]]。"

CONSULTATION_CRITERIA = {
    "proactivity": (
        "主动性",
        "在信息不足时，医生能否主动、明确地询问患者的症状、体格检查结果和病史等更多信息",
    ),
    "accuracy": ("准确性", "医生给出的诊断和建议是否准确、无事实错误，不草率下结论"),
    "helpfulness": (
        "帮助性",
        "医生的回复能否为患者提供清晰、有指导意义且切实可行的帮助，回应患者关切",
    ),
    "linguistic_quality": (
        "语言质量",
        "对话是否合乎逻辑，医生是否正确理解患者的意思，表达是否流畅自然",
    ),
}
CONSULTATION_RUBRIC = (
    "你是一名资深的临床医学专家，请评估下面这段医患问诊对话中“医生”的表现。\n"
    + "".join(
        f"{i}. {zh}（1-5分）：{desc}；\n"
        for i, (zh, desc) in enumerate(CONSULTATION_CRITERIA.values(), 1)
    )
    + "每项1分最差、5分最好。如提供了病例信息，请据此判断准确性。\n"
    "先简要说明理由，最后一行只输出JSON，例如："
    '{"主动性": 3, "准确性": 4, "帮助性": 4, "语言质量": 5}'
)
CONSULTATION_REMINDER = '请只输出JSON：{"主动性": 分数, "准确性": 分数, "帮助性": 分数, "语言质量": 分数}，分数为1-5的整数。'


def rubric_hash() -> str:
    """Short hash of both rubrics; recorded so that results from different rubrics never mix."""
    text = PAIRWISE_RUBRIC + PAIRWISE_REMINDER + CONSULTATION_RUBRIC + CONSULTATION_REMINDER
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _transcript(pairs, user="患者", assistant="医生") -> str:
    return "\n".join(f"{user}：{q}\n{assistant}：{a}" for q, a in pairs)


def pairwise_messages(item: QAItem, first: str, second: str, use_reference: bool = True) -> Chat:
    """The judge's chat for one order of a pair: ``first`` is shown as A, ``second`` as B."""
    parts = []
    if item.history:
        parts.append(f"[对话历史]\n{_transcript(item.history)}")
    parts.append(f"[患者问题]\n{item.question}")
    if use_reference and item.reference:
        parts.append(f"[参考答案]\n{item.reference}")
    parts.append(f"[助手A的回答]\n{first}")
    parts.append(f"[助手B的回答]\n{second}")
    return [
        {"role": "system", "content": PAIRWISE_RUBRIC},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_verdict(text: str) -> str | None:
    """``'first'`` / ``'second'`` / ``'tie'`` from the last ``[[A]]``/``[[B]]``/``[[C]]``."""
    found = _VERDICT.findall((text or "").replace("［", "[").replace("］", "]"))
    if not found:
        return None
    return {"A": "first", "B": "second", "C": "tie"}[found[-1]]


def combine_orders(v_ab: str | None, v_ba: str | None) -> str:
    """A's outcome from the two orders (A shown first, then B shown first): agreement or tie."""
    if v_ab == "first" and v_ba == "second":
        return "win"
    if v_ab == "second" and v_ba == "first":
        return "lose"
    return "tie"


def consultation_messages(d: Dialogue, doctor_turns: list[str] | None = None) -> Chat:
    """The judge's chat for one consultation; ``doctor_turns`` replace the recorded replies."""
    lines, k = [], 0
    for role, text in d.turns:
        if role == "doctor":
            text = doctor_turns[k] if doctor_turns is not None else text
            k += 1
        lines.append(f"{'医生' if role == 'doctor' else '患者'}：{text}")
    parts = [f"[病例信息]\n{d.case}"] if d.case else []
    parts.append("[问诊对话]\n" + "\n".join(lines))
    return [
        {"role": "system", "content": CONSULTATION_RUBRIC},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def parse_scores(text: str) -> dict[str, int] | None:
    """The four 1–5 scores (Chinese or English keys) or None when any is missing."""
    out = {}
    for key, (zh, _) in CONSULTATION_CRITERIA.items():
        m = re.search(rf"(?:{zh}|{key})[\"'”\s]*[:：]\s*[\"']?([1-5])(?![\d.])", text or "", re.I)
        if not m:
            return None
        out[key] = int(m.group(1))
    return out


@dataclass
class JudgeReply:
    """A parsed verdict (None if every attempt was malformed) and the raw replies."""

    value: object
    replies: list[str]


class Judge:
    """Deterministic judge calls (temperature, seed) with format retries."""

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.client = make_client(cfg, "judge")

    def info(self) -> dict:
        """Judge model, endpoint, sampling settings and the rubric hash."""
        return {
            "model": self.cfg.model,
            "base_url": str(self.client.base_url),
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
            "seed": self.cfg.seed,
            "format_retries": self.cfg.format_retries,
            "use_reference": self.cfg.use_reference,
            "rubric_sha256_12": rubric_hash(),
        }

    def _complete(self, messages: Chat) -> str:
        r = self.client.chat.completions.create(
            model=self.cfg.model,
            messages=messages,
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens,
            seed=self.cfg.seed,
        )
        return r.choices[0].message.content or ""

    def ask(self, messages: Chat, parse: Callable[[str], object], reminder: str) -> JudgeReply:
        """Ask, parse, and re-ask with ``reminder`` after a malformed reply."""
        replies: list[str] = []
        msgs = list(messages)
        for _ in range(self.cfg.format_retries + 1):
            reply = self._complete(msgs)
            replies.append(reply)
            value = parse(reply)
            if value is not None:
                return JudgeReply(value, replies)
            msgs = [
                *msgs,
                {"role": "assistant", "content": reply},
                {"role": "user", "content": reminder},
            ]
        logger.warning("judge reply malformed after %d attempts", len(replies))
        return JudgeReply(None, replies)

    def pair(self, item: QAItem, a: str, b: str) -> dict:
        """Judge A vs B in both orders; returns the outcome for A and both raw verdicts."""
        ref = self.cfg.use_reference
        ab = self.ask(pairwise_messages(item, a, b, ref), parse_verdict, PAIRWISE_REMINDER)
        ba = self.ask(pairwise_messages(item, b, a, ref), parse_verdict, PAIRWISE_REMINDER)
        return {
            "outcome": combine_orders(ab.value, ba.value),
            "verdict_ab": ab.value,
            "verdict_ba": ba.value,
            "malformed": int(ab.value is None) + int(ba.value is None),
            "judge_replies_ab": ab.replies,
            "judge_replies_ba": ba.replies,
        }

    def consultation(self, d: Dialogue, doctor_turns: list[str] | None = None) -> dict:
        """The four criterion scores of one consultation (None when malformed)."""
        r = self.ask(consultation_messages(d, doctor_turns), parse_scores, CONSULTATION_REMINDER)
        return {"scores": r.value, "judge_replies": r.replies}
