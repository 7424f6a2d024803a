"""Chat formats: a conversation -> a list of pieces (special tokens and text) with loss spans.

A format describes *where* the supervised characters are; the encoder turns pieces into ids.
Text pieces are cut only at special tokens, which is where the tokenizer cuts too (added tokens
are split out before normalisation and pre-tokenisation), so encoding the pieces one by one and
joining the ids gives exactly the ids of the whole rendered string. Other families (LLaMA-2
``[INST]``, Baichuan's reserved tokens) plug in as further :class:`ChatFormat` subclasses
registered in :data:`FORMATS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from sfmed.core.errors import ConfigError


class Turn(NamedTuple):
    """One message: ``role`` is ``system``, ``user`` or ``assistant``."""

    role: str
    content: str


class Piece(NamedTuple):
    """A special token (``special`` = its text) or a text piece.

    ``train_from``: for text, the character offset from which the piece is supervised (tokens
    that hold any character at or after it are trained; ``None`` = not supervised); for a special
    token, 0 = supervised, ``None`` = not.
    """

    text: str
    special: bool = False
    train_from: int | None = None


class ChatFormat:
    """Base of chat formats; subclasses implement :meth:`pieces`."""

    name = ""
    default_system: str | None = None
    requires_alternation = False
    """True for templates that raise on two user turns in a row."""
    specials: tuple[str, ...] = ()
    """The special tokens the format emits (each must be one id of the tokenizer)."""

    def pieces(self, turns: list[Turn], train: list[bool]) -> list[list[Piece]]:
        """The pieces of each turn (system first if any; a piece spanning two turns belongs to
        the later one, so truncation after a turn never splits a piece); ``train[i]`` says
        whether turn ``i`` (an assistant turn) is supervised."""
        raise NotImplementedError

    def render(self, turns: list[Turn]) -> str:
        """The rendered string (what ``apply_chat_template(..., tokenize=False)`` returns)."""
        return "".join(p.text for g in self.pieces(turns, [False] * len(turns)) for p in g)

    def with_system(self, turns: list[Turn], system: str | None) -> list[Turn]:
        """``turns`` with a leading system turn: the record's, else ``system``, else the
        template's default (no system turn when both are ``None``)."""
        if turns and turns[0].role == "system":
            return turns
        s = system if system is not None else self.default_system
        return turns if s is None else [Turn("system", s), *turns]


class ChatML(ChatFormat):
    """Qwen2's ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn.

    Supervised: the assistant content and its ``<|im_end|>`` (the model must learn to stop).
    Not supervised: the ``\\n`` after ``<|im_end|>``: generation stops at ``<|im_end|>`` and never
    produces it. Toolchains disagree here (LLaMA-Factory trains it, TRL's assistant masks and
    ms-swift do not); at inference it is never predicted, so training it only adds a trivial
    token to the loss.
    """

    name = "chatml"
    default_system = "You are a helpful assistant."
    start, end = "<|im_start|>", "<|im_end|>"
    specials = (start, end)

    _START = Piece(start, True)
    _END = (Piece(end, True), Piece(end, True, 0))  # not supervised / supervised
    _NL = Piece("\n")

    def pieces(self, turns: list[Turn], train: list[bool]) -> list[list[Piece]]:
        s, e, nl = self._START, self._END, self._NL
        return [
            [s, Piece(f"{t.role}\n{t.content}", False, len(t.role) + 1 if tr else None), e[tr], nl]
            for t, tr in zip(turns, train, strict=True)
        ]


FORMATS: dict[str, type[ChatFormat]] = {"chatml": ChatML}

_PROBE = [
    Turn("user", "你好，最近总是头痛。"),
    Turn("assistant", "头痛持续多久了？"),
    Turn("user", "两周。"),
    Turn("assistant", "建议就诊。"),
]


def chat_template_of(tokenizer_dir: str | Path) -> str | None:
    """The ``chat_template`` of an HF tokenizer folder (tokenizer_config.json or
    chat_template.jinja), or None."""
    import json

    d = Path(tokenizer_dir)
    d = d if d.is_dir() else d.parent
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        t = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(t, list):  # named templates: take the default one
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        return t
    return None


def _jinja(template: str):
    """``render(messages) -> str`` with the Jinja settings transformers' ``apply_chat_template``
    uses (sandboxed, trim_blocks, lstrip_blocks, loop controls); importing transformers (and
    torch) here would cost more than preprocessing a small corpus."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ConfigError(f"the chat_template refused a probe conversation: {message}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    tpl = env.from_string(template)
    return lambda msgs: tpl.render(messages=msgs, add_generation_prompt=False)


def resolve_format(name: str, tokenizer_dir: str | Path) -> ChatFormat:
    """The chat format for ``chat.template=name``; with the tokenizer's own template, check that
    our rendering equals ``apply_chat_template(tokenize=False)`` on probe conversations (with and
    without a system turn) before any work, so a template we do not reproduce fails loudly."""
    template = chat_template_of(tokenizer_dir)
    if name == "auto":
        if template is None:
            raise ConfigError(
                f"chat.template=auto but the tokenizer at {tokenizer_dir} has no chat_template; "
                f"set chat.template to one of {list(FORMATS)}"
            )
        name = "chatml" if "<|im_start|>" in template else ""
        if not name:
            raise ConfigError(
                f"the chat_template of {tokenizer_dir} is not one sfmed knows (known: "
                f"{list(FORMATS)}); set chat.template explicitly"
            )
    fmt = FORMATS[name]()
    if template is not None:
        render = _jinja(template)
        for given, turns in (
            (_PROBE, fmt.with_system(_PROBE, None)),
            ([Turn("system", "你是医生。"), *_PROBE],) * 2,
        ):
            msgs = [{"role": t.role, "content": t.content} for t in given]
            want = render(msgs)
            if want != fmt.render(turns):
                raise ConfigError(
                    f"chat.template={name}: the tokenizer's chat_template at {tokenizer_dir} "
                    f"renders differently ({want[:120]!r}); choose the matching chat.template"
                )
    return fmt
