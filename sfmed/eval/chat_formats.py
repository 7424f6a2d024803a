"""How a chat becomes the prompt text a model sees: a registry of named chat formats.

``template`` uses the tokenizer's own chat template; ``plain`` joins the turns' contents for base
models. Model families whose published chat format is not a tokenizer template (LLaMA-2 chat,
Ziya, Baichuan…) register their own with :func:`register_chat_format`; evaluation selects one by
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
