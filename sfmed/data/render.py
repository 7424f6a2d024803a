"""Rendering a record into pretraining text, per corpus shape.

``make_renderer(opts)`` returns ``render(record) -> str``; it raises ``MalformedRecord`` for a
record that lacks what the shape needs and returns ``""`` for one whose content is empty.
Shapes: ``field`` (one field), ``template`` (fields into a template of parts), ``history``
(CMtMedQA ``history: [[q, a], ...]`` + last turn), ``dialogue`` (``[{role, content}]`` or
ShareGPT ``[{from, value}]``), ``mcq`` (question, options, answer, explanation).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sfmed.data.readers import MalformedRecord

_MISSING = object()
# A name is any identifier, Chinese included (``{问}``): corpora of this field name their
# columns in Chinese.
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^\W\d]\w*)\}")

DEFAULT_ROLES: dict[str, str | None] = {
    "user": "问：",
    "human": "问：",
    "patient": "问：",
    "assistant": "答：",
    "gpt": "答：",
    "doctor": "答：",
    "bot": "答：",
    "system": "",
}
HISTORY_TEMPLATE = "问：{q}\n答：{a}"
MCQ_TEMPLATE = ["{question}", "{options}", "答案：{answer}", "解析：{explanation}"]
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def lookup(rec: Any, key: str) -> Any:
    """``rec[key]`` with dotted paths into nested objects/lists; ``_MISSING`` when absent."""
    if type(rec) is dict and "." not in key:
        return rec.get(key, _MISSING)
    obj = rec
    for part in key.split("."):
        if isinstance(obj, dict):
            if part not in obj:
                return _MISSING
            obj = obj[part]
        elif (
            isinstance(obj, list)
            and part.lstrip("-").isdigit()
            and -len(obj) <= int(part) < len(obj)
        ):
            obj = obj[int(part)]
        else:
            return _MISSING
    return obj


def as_text(value: Any, key: str, sep: str = "\n") -> str:
    """A field value as text: strings as is, lists of strings joined (huatuo26M's one-element
    lists), numbers formatted, None empty; objects are malformed."""
    if type(value) is str:
        return value
    if value is None or value is _MISSING:
        return ""
    if isinstance(value, list):
        return sep.join(as_text(v, key, sep) for v in value if v is not None)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    raise MalformedRecord(f"field {key!r} holds a {type(value).__name__}, not text")


class Template:
    """A template of parts with ``{name}`` placeholders (``{{``/``}}`` for literal braces);
    parts whose placeholders are all empty are left out."""

    def __init__(self, template: str | list[str], join: str = "\n"):
        parts = [template] if isinstance(template, str) else list(template)
        self.join = join
        self.parts: list[list[tuple[bool, str]]] = []
        self.names: list[str] = []
        for part in parts:
            toks: list[tuple[bool, str]] = []
            pos = 0
            for m in _PLACEHOLDER.finditer(str(part)):
                if m.start() > pos:
                    toks.append((False, part[pos : m.start()]))
                if m.group(1):
                    toks.append((True, m.group(1)))
                    if m.group(1) not in self.names:
                        self.names.append(m.group(1))
                else:
                    toks.append((False, m.group(0)[0]))
                pos = m.end()
            if pos < len(part):
                toks.append((False, part[pos:]))
            self.parts.append(toks)

    def render(self, values: dict[str, str]) -> str:
        """Fill the template; ``""`` when every placeholder is empty."""
        if not any(values.get(n) for n in self.names):
            return ""
        out = []
        for toks in self.parts:
            names = [v for is_name, v in toks if is_name]
            if names and not any(values.get(n) for n in names):
                continue
            out.append("".join(values.get(v, "") if is_name else v for is_name, v in toks))
        return self.join.join(out)


def _values(rec: Any, names: list[str], fields: dict, required: set[str], sep: str) -> dict:
    vals = {}
    for n in names:
        key = fields.get(n, n)
        v = lookup(rec, key)
        if v is _MISSING:
            if n in required:
                raise MalformedRecord(f"missing field {key!r}")
            vals[n] = ""
        else:
            vals[n] = as_text(v, key, sep)
    return vals


def _check_dict(rec: Any) -> None:
    if not isinstance(rec, dict):
        raise MalformedRecord(f"record is a {type(rec).__name__}, not an object")


def make_renderer(opts) -> Callable[[Any], str]:
    """``render(record) -> text`` for a source's ``ReaderOptions``."""
    shape = opts.render
    fields = dict(opts.fields or {})
    join = opts.join
    if shape == "field":
        key = opts.text_field

        def render_field(rec: Any) -> str:
            if type(rec) is str:
                return rec
            if isinstance(rec, list):  # e.g. MedDialog: a dialogue is a list of utterances
                return as_text(rec, "record", join)
            if not isinstance(rec, dict):
                raise MalformedRecord(f"record is a {type(rec).__name__}, not an object")
            v = lookup(rec, key)
            if type(v) is str:
                return v
            if v is _MISSING:
                raise MalformedRecord(f"missing field {key!r}")
            return as_text(v, key, join)

        return render_field

    if shape == "template":
        tpl = Template(opts.template, join)
        required = set(opts.required if opts.required is not None else tpl.names)

        def render_template(rec: Any) -> str:
            _check_dict(rec)
            return tpl.render(_values(rec, tpl.names, fields, required, join))

        return render_template

    if shape == "history":
        tpl = Template(opts.template or HISTORY_TEMPLATE, "\n")
        q_name, a_name = (tpl.names + ["q", "a"])[:2]
        # CMtMedQA's layout by default; `fields` renames any of them.
        keys = {
            "history": "history",
            "query": "instruction",
            "input": "input",
            "response": "output",
        }
        keys.update(fields)
        required = set(opts.required if opts.required is not None else ["query", "response"])

        def render_history(rec: Any) -> str:
            _check_dict(rec)
            turns = []
            hist = lookup(rec, keys["history"])
            if hist is _MISSING or hist is None:
                hist = []
            if not isinstance(hist, list):
                raise MalformedRecord(f"{keys['history']!r} is not a list of [question, answer]")
            for t in hist:
                if isinstance(t, dict):
                    t = [t.get("q", t.get("question")), t.get("a", t.get("answer"))]
                if not isinstance(t, (list, tuple)) or len(t) != 2:
                    raise MalformedRecord(f"history turn {t!r} is not [question, answer]")
                turns.append({q_name: as_text(t[0], "history"), a_name: as_text(t[1], "history")})
            v = _values(rec, ["query", "input", "response"], keys, required, join)
            q = v["query"] + (("\n" + v["input"]) if v["input"] else "")
            if q or v["response"]:
                turns.append({q_name: q, a_name: v["response"]})
            return join.join(t for t in (tpl.render(turn) for turn in turns) if t)

        return render_history

    if shape == "dialogue":
        roles = dict(DEFAULT_ROLES)
        roles.update(opts.roles or {})
        msg_key = fields.get("messages")
        role_key, content_key = fields.get("role"), fields.get("content")

        def render_dialogue(rec: Any) -> str:
            _check_dict(rec)
            if msg_key is None:
                msgs = next(
                    (rec[k] for k in ("messages", "conversation", "conversations") if k in rec),
                    _MISSING,
                )
                where = "messages/conversation/conversations"
            else:
                msgs, where = lookup(rec, msg_key), msg_key
            if msgs is _MISSING:
                raise MalformedRecord(f"missing field {where!r}")
            if not isinstance(msgs, list):
                raise MalformedRecord(f"{where!r} is not a list of messages")
            out = []
            for m in msgs:
                if not isinstance(m, dict):
                    raise MalformedRecord(f"message {m!r} is not an object")
                role = m.get(role_key) if role_key else m.get("role", m.get("from"))
                content = m.get(content_key) if content_key else m.get("content", m.get("value"))
                if role is None or content is None:
                    raise MalformedRecord(f"message without role/content: {str(m)[:80]}")
                if role not in roles:
                    raise MalformedRecord(
                        f"unknown role {role!r}; add it to roles (role -> prefix, null to skip)"
                    )
                prefix = roles[role]
                if prefix is None:
                    continue
                text = as_text(content, "content")
                if text:
                    out.append(prefix + text)
            return join.join(out)

        return render_dialogue

    if shape == "mcq":
        tpl = Template(opts.template or MCQ_TEMPLATE, join)
        option_keys = list(opts.option_keys or [])
        default_required = ["question", "answer"] + ([] if option_keys else ["options"])
        required = set(opts.required if opts.required is not None else default_required)
        names = [n for n in tpl.names if n != "options" or not option_keys]

        def render_mcq(rec: Any) -> str:
            _check_dict(rec)
            vals = _values(rec, [n for n in names if n != "options"], fields, required, join)
            if "options" in tpl.names:
                if option_keys:
                    opts_text = []
                    for k in option_keys:
                        v = lookup(rec, k)
                        if v is _MISSING:
                            raise MalformedRecord(f"missing option column {k!r}")
                        opts_text.append(f"{k}. {as_text(v, k)}")
                    vals["options"] = join.join(opts_text)
                else:
                    key = fields.get("options", "options")
                    v = lookup(rec, key)
                    if v is _MISSING and "options" in required:
                        raise MalformedRecord(f"missing field {key!r}")
                    vals["options"] = format_options(v, key, join)
            return tpl.render(vals)

        return render_mcq

    raise ValueError(f"render={shape!r} is not a known shape")


def format_options(v: Any, key: str, join: str = "\n") -> str:
    """Options as ``A. ...`` lines from a dict, a list (of strings or {key, value}) or a string."""
    if v is _MISSING or v is None:
        return ""
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, dict):
        return join.join(f"{k}. {as_text(x, key)}" for k, x in v.items())
    if isinstance(v, list):
        lines = []
        for i, x in enumerate(v):
            if isinstance(x, dict) and ("key" in x or "label" in x):
                label = x.get("key", x.get("label"))
                lines.append(f"{label}. {as_text(x.get('value', x.get('text')), key)}")
            else:
                lines.append(f"{_LETTERS[i] if i < 26 else i + 1}. {as_text(x, key)}")
        return join.join(lines)
    raise MalformedRecord(f"field {key!r} holds a {type(v).__name__}, not options")
