"""Records -> turns, for every conversation shape the corpus YAMLs know.

``make_turns(opts)`` returns ``extract(record) -> list[Turn]`` (a leading system turn when the
record has one) from a source's reader options: ``render=dialogue`` (``[{role, content}]``,
ShareGPT ``[{from, value}]``), ``render=history`` (CMtMedQA ``history: [[q, a], ...]`` + last
turn), ``render=template`` (one question/answer pair from fields: ``instruction/input/output``,
ChatMed ``query/response``, huatuo26M's one-element lists). ``make_pairs(opts)`` does the same for
preference records. Problems raise :class:`BadRecord` with a report reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sfmed.config.sft_data import DEFAULT_CHAT_ROLES
from sfmed.core.errors import ConfigError
from sfmed.data.chat.formats import Turn
from sfmed.data.render import _MISSING, Template, as_text, lookup

# Reasons a record or pair is not used (report keys), in report order.
SFT_REASONS = (
    "malformed",
    "unknown_role",
    "empty_user",
    "empty_assistant",
    "no_assistant",
    "misplaced_system",
    "starts_on_assistant",
    "consecutive_turns",
    "ends_on_user",
    "special_token",
    "too_long",
)
PAIR_REASONS = (
    "malformed",
    "unknown_role",
    "empty_user",
    "empty_side",
    "misplaced_system",
    "consecutive_turns",
    "prompt_not_on_user",
    "special_token",
    "identical",
    "too_long",
    "prompt_too_long",
    "same_after_truncation",
)

_MESSAGE_KEYS = ("messages", "conversation", "conversations")


class BadRecord(ValueError):
    """A record that cannot be used; ``reason`` is its report key."""

    def __init__(self, reason: str, msg: str):
        super().__init__(msg)
        self.reason = reason


def _text(v: Any, key: str, join: str) -> str:
    try:
        return as_text(v, key, join).strip()
    except ValueError as e:
        raise BadRecord("malformed", str(e)) from None


def _system(rec: dict, key: str | None, join: str) -> list[Turn]:
    if not key:
        return []
    v = lookup(rec, key)
    s = "" if v is _MISSING else _text(v, key, join)
    return [Turn("system", s)] if s else []


def _check_dict(rec: Any) -> dict:
    if not isinstance(rec, dict):
        raise BadRecord("malformed", f"record is a {type(rec).__name__}, not an object")
    return rec


class _Messages:
    """Message lists (``[{role, content}]`` / ``[{from, value}]``) -> turns."""

    def __init__(self, opts):
        fields = dict(opts.fields or {})
        self.msg_key = fields.get("messages")
        self.role_key, self.content_key = fields.get("role"), fields.get("content")
        self.roles = {**DEFAULT_CHAT_ROLES, **(opts.turns.roles or {})}
        self.join = opts.join

    def find(self, rec: dict) -> Any:
        if self.msg_key is not None:
            return lookup(rec, self.msg_key), self.msg_key
        return next((rec[k] for k in _MESSAGE_KEYS if k in rec), _MISSING), "messages"

    def turns(self, msgs: Any, where: str) -> list[Turn]:
        if msgs is _MISSING:
            raise BadRecord("malformed", f"missing field {where!r}")
        if not isinstance(msgs, list):
            raise BadRecord("malformed", f"{where!r} is not a list of messages")
        out = []
        for m in msgs:
            if not isinstance(m, dict):
                raise BadRecord("malformed", f"message {str(m)[:60]!r} is not an object")
            role = m.get(self.role_key) if self.role_key else m.get("role", m.get("from"))
            content = (
                m.get(self.content_key) if self.content_key else m.get("content", m.get("value"))
            )
            if role is None or content is None:
                raise BadRecord("malformed", f"message without role/content: {str(m)[:80]}")
            if role not in self.roles:
                raise BadRecord(
                    "unknown_role",
                    f"unknown role {role!r}; map it with turns.roles.{role}=user|assistant|system",
                )
            mapped = self.roles[role]
            if mapped is not None:
                out.append(Turn(mapped, _text(content, "content", self.join)))
        return out


def make_turns(opts) -> Callable[[Any], list[Turn]]:
    """``extract(record) -> turns`` for a source's reader options (``render`` picks the shape)."""
    shape, join, t = opts.render, opts.join, opts.turns
    fields = dict(opts.fields or {})
    if shape == "dialogue":
        m = _Messages(opts)

        def dialogue(rec: Any) -> list[Turn]:
            rec = _check_dict(rec)
            turns = m.turns(*m.find(rec))
            sys_ = _system(rec, t.system, join)
            return sys_ + turns if sys_ and not (turns and turns[0].role == "system") else turns

        return dialogue

    if shape == "history":
        keys = {
            "history": "history",
            "query": "instruction",
            "input": "input",
            "response": "output",
        }
        keys.update({k: v for k, v in fields.items() if k in keys})

        def history(rec: Any) -> list[Turn]:
            rec = _check_dict(rec)
            hist = lookup(rec, keys["history"])
            hist = [] if hist is _MISSING or hist is None else hist
            if not isinstance(hist, list):
                raise BadRecord("malformed", f"{keys['history']!r} is not a list of [q, a]")
            turns = _system(rec, t.system, join)
            for pair in hist:
                if isinstance(pair, dict):
                    pair = [pair.get("q", pair.get("question")), pair.get("a", pair.get("answer"))]
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise BadRecord("malformed", f"history turn {str(pair)[:60]} is not [q, a]")
                turns += [Turn("user", _text(pair[0], "history", join))]
                turns += [Turn("assistant", _text(pair[1], "history", join))]
            q = [_field(rec, keys[k], join, k != "input") for k in ("query", "input")]
            turns.append(Turn("user", join.join(x for x in q if x)))
            turns.append(Turn("assistant", _field(rec, keys["response"], join, True)))
            return turns

        return history

    if shape == "template":
        names = Template(opts.template, join).names
        prompt = list(t.prompt) if t.prompt else names[:-1]
        response = t.response or (names[-1] if names else None)
        if not prompt or not response:
            raise ConfigError(
                "render=template: cannot tell the question from the answer; set "
                "turns.prompt=[fields] and turns.response=<field>"
            )
        prompt_keys = [fields.get(n, n) for n in prompt]
        response_key = fields.get(response, response)
        required = set(opts.required) if opts.required is not None else None

        def template(rec: Any) -> list[Turn]:
            rec = _check_dict(rec)
            q = [
                _field(rec, k, join, required is None or n in required)
                for n, k in zip(prompt, prompt_keys, strict=True)
            ]
            return [
                *_system(rec, t.system, join),
                Turn("user", join.join(x for x in q if x)),
                Turn("assistant", _field(rec, response_key, join, True)),
            ]

        return template

    raise ConfigError(
        f"render={shape!r} has no conversation turns; chat formats read render=dialogue, history "
        "or template sources"
    )


def _field(rec: dict, key: str, join: str, required: bool) -> str:
    v = lookup(rec, key)
    if v is _MISSING:
        if required:
            raise BadRecord("malformed", f"missing field {key!r}")
        return ""
    return _text(v, key, join)


def make_pairs(opts) -> Callable[[Any], tuple[list[Turn], str, str]]:
    """``extract(record) -> (prompt turns, chosen answer, rejected answer)`` for preference
    records: ``question/response_chosen/response_rejected`` (MedicalGPT reward data),
    ``conversations`` + ``chosen`` + ``rejected`` (ShareGPT style), ``prompt/chosen/rejected``
    (TRL: prompt a string or messages; answers strings or one assistant message)."""
    join, t = opts.join, opts.turns
    m = _Messages(opts)

    def answer(rec: dict, keys: tuple[str, ...]) -> str:
        key = next((k for k in keys if k and lookup(rec, k) is not _MISSING), None)
        if key is None:
            raise BadRecord("malformed", f"missing field {' / '.join(k for k in keys if k)!r}")
        v = lookup(rec, key)
        if isinstance(v, dict):
            v = [v]
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            turns = m.turns(v, key)
            if len(turns) != 1 or turns[0].role != "assistant":
                raise BadRecord("malformed", f"{key!r} must hold one assistant message")
            return turns[0].content
        return _text(v, key, join)

    def pair(rec: Any) -> tuple[list[Turn], str, str]:
        rec = _check_dict(rec)
        msgs, where = m.find(rec)
        if msgs is not _MISSING:
            prompt = m.turns(msgs, where)
        elif "prompt" in rec:
            p = rec["prompt"]
            if isinstance(p, list) and all(isinstance(x, dict) for x in p):
                prompt = m.turns(p, "prompt")
            else:
                prompt = [Turn("user", _text(p, "prompt", join))]
        else:
            q = [_field(rec, k, join, False) for k in ("question", "query", "instruction", "input")]
            if not any(q):
                raise BadRecord("malformed", "no prompt: none of messages/prompt/question found")
            prompt = [Turn("user", join.join(x for x in q if x))]
        sys_ = _system(rec, t.system, join)
        if sys_ and not (prompt and prompt[0].role == "system"):
            prompt = sys_ + prompt
        chosen = answer(rec, (t.chosen, "chosen", "response_chosen"))
        rejected = answer(rec, (t.rejected, "rejected", "response_rejected"))
        return prompt, chosen, rejected

    return pair
