"""How a chat becomes the prompt text a model sees: a registry of named chat formats.

``template`` uses the tokenizer's own chat template; ``plain`` joins the turns' contents for base
models. The conversation formats of the model families (ChatML, LLaMA-2 chat, Chinese-Alpaca,
Ziya, ChiMed-GPT, Baichuan) come from the one registry :data:`sfmed.data.chat.formats.FORMATS`
that SFT/DPO preprocessing also encodes; other renderers register with
:func:`register_chat_format`. Evaluation selects one by
name (``chat_format=`` for a run, ``chat_format:`` per model in a suite), and ``auto`` picks
``template`` when the tokenizer has one, else ``plain``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sfmed.core.errors import ConfigError

Chat = list[dict[str, str]]


@dataclass(frozen=True)
class ChatFormat:
    """A named renderer; ``add_special_tokens`` says whether the tokenizer should add BOS/EOS
    (a chat template writes its own special tokens, plain text does not)."""

    name: str
    render: Callable[[Chat, object], str]  # (chat, tokenizer) -> prompt text
    add_special_tokens: bool
    needs_template: bool = False


CHAT_FORMATS: dict[str, ChatFormat] = {}


def register_chat_format(
    name: str, *, add_special_tokens: bool, needs_template: bool = False
) -> Callable[[Callable[[Chat, object], str]], Callable[[Chat, object], str]]:
    """Decorator: register ``fn(chat, tokenizer) -> str`` as chat format ``name``."""

    def deco(fn: Callable[[Chat, object], str]) -> Callable[[Chat, object], str]:
        if name in CHAT_FORMATS or name == "auto":
            raise ValueError(f"chat format {name!r} is already registered")
        CHAT_FORMATS[name] = ChatFormat(name, fn, add_special_tokens, needs_template)
        return fn

    return deco


@register_chat_format("template", add_special_tokens=False, needs_template=True)
def render_template(chat: Chat, tok) -> str:
    """The tokenizer's ``chat_template`` with the generation prompt appended."""
    return tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


@register_chat_format("plain", add_special_tokens=True)
def render_plain(chat: Chat, tok=None) -> str:
    """The turns' contents joined by blank lines, for base models without a chat template.

    Earlier turns (few-shot examples or dialogue history) are kept in order so that a base model
    continues the last one.
    """
    return "\n\n".join(m["content"] for m in chat if m["role"] != "system" or m["content"])


def resolve_chat_format(name: str, tok, where: str = "chat_format") -> ChatFormat:
    """The format ``name`` for tokenizer ``tok``; ``auto`` = template when it has one, else plain."""
    has_template = bool(getattr(tok, "chat_template", None))
    if name == "auto":
        return CHAT_FORMATS["template" if has_template else "plain"]
    if name not in CHAT_FORMATS:
        raise ConfigError(
            f"{where}={name!r} is not a registered chat format; use auto or one of "
            f"{sorted(CHAT_FORMATS)} (register more with sfmed.eval.chat_formats."
            "register_chat_format)"
        )
    fmt = CHAT_FORMATS[name]
    if fmt.needs_template and not has_template:
        raise ConfigError(
            f"{where}={name} but the tokenizer has no chat_template; use {where}=plain for a "
            "base model, or a registered format of the model's family"
        )
    return fmt


def format_name(chat_format: str, use_chat_template: bool | None) -> str:
    """The format name from the two settings: ``use_chat_template`` true/false is shorthand for
    ``template``/``plain`` when ``chat_format`` is left at ``auto``."""
    if chat_format != "auto" or use_chat_template is None:
        return chat_format
    return "template" if use_chat_template else "plain"


# ---- the conversation formats of the model families' chat releases ------------------------------
# One place per format: sfmed.data.chat.formats.FORMATS, which SFT/DPO preprocessing encodes.
# Evaluation renders the same format's generation prompt with the tokenizer's own special-token
# strings (tokenizing the text with the registered add_special_tokens gives the ids the chat
# model was fine-tuned on).


def family_format(name: str, tok):
    """The registry format ``name`` bound to the HF tokenizer ``tok`` (its BOS/EOS strings and
    id -> token look-up; ``tok`` may be None for formats that need no token look-up)."""
    from sfmed.data.chat.formats import make_format

    if tok is None:
        return make_format(name)
    return make_format(
        name,
        bos=getattr(tok, "bos_token", None),
        eos=getattr(tok, "eos_token", None),
        id_to_token=lambda i: tok.convert_ids_to_tokens([i])[0],
    )


def _register_family_formats() -> None:
    from sfmed.data.chat.formats import FORMATS, Turn

    for name, cls in FORMATS.items():

        def render(chat: Chat, tok=None, _name=name, _drop=cls.tokenizer_adds_bos) -> str:
            turns = [Turn(m["role"], m["content"]) for m in chat]
            return family_format(_name, tok).render_prompt(turns, drop_bos=_drop)

        render.__doc__ = cls.__doc__
        register_chat_format(name, add_special_tokens=cls.tokenizer_adds_bos)(render)


_register_family_formats()
