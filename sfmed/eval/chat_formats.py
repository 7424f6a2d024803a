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


# ---- the conversation formats of the model families' chat releases ------------------------------
# Each renders the prompt up to the point where the assistant's answer starts. Special tokens are
# written as the tokenizer's own token strings, so tokenizing the text with
# add_special_tokens=False gives the ids the chat model was fine-tuned on.


def _system_and_turns(chat: Chat) -> tuple[str | None, Chat]:
    if chat and chat[0]["role"] == "system":
        return chat[0]["content"], chat[1:]
    return None, chat


@register_chat_format("chatml", add_special_tokens=False)
def render_chatml(chat: Chat, tok=None) -> str:
    """Qwen's ChatML (Qwen1.5/2/2.5/3): ``<|im_start|>role\\ncontent<|im_end|>\\n`` per turn, then
    ``<|im_start|>assistant\\n``. No default system message is added (Qwen2/2.5's templates add
    one when the chat has none; give it as the first turn to match them)."""
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat)
    return body + "<|im_start|>assistant\n"


def _special(tok, name: str, default: str) -> str:
    value = getattr(tok, name, None) if tok is not None else None
    return value if isinstance(value, str) and value else default


@register_chat_format("llama2", add_special_tokens=False)
def render_llama2(chat: Chat, tok=None) -> str:
    """LLaMA-2-chat: ``<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] answer </s>``
    per exchange (Meta's reference and the template of the Llama-2-chat tokenizer)."""
    bos, eos = _special(tok, "bos_token", "<s>"), _special(tok, "eos_token", "</s>")
    system, turns = _system_and_turns(chat)
    out = []
    for i, m in enumerate(turns):
        content = m["content"]
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            out.append(f"{bos}[INST] {content.strip()} [/INST]")
        elif m["role"] == "assistant":
            out.append(f" {content.strip()} {eos}")
        else:
            raise ConfigError(f"llama2 chat format: unexpected role {m['role']!r} in turn {i}")
    return "".join(out)


ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)


@register_chat_format("chinese_alpaca", add_special_tokens=True)
def render_chinese_alpaca(chat: Chat, tok=None) -> str:
    """Chinese-Alpaca (Chinese-LLaMA-Alpaca, incl. Plus): the Stanford Alpaca prompt,
    ``{system}\\n\\n### Instruction:\\n{user}\\n\\n### Response: `` (earlier exchanges are
    kept as instruction/response pairs); the tokenizer adds BOS."""
    system, turns = _system_and_turns(chat)
    parts = [system if system is not None else ALPACA_SYSTEM]
    for m in turns:
        if m["role"] == "user":
            parts.append(f"\n\n### Instruction:\n{m['content']}\n\n### Response: ")
        else:
            parts.append(m["content"])
    return "".join(parts)


@register_chat_format("ziya", add_special_tokens=True)
def render_ziya(chat: Chat, tok=None) -> str:
    """Ziya (IDEA-CCNL): ``<human>:{user}\\n<bot>:{answer}\\n`` per exchange, ending with
    ``<bot>:``; a system message goes first on its own line; the tokenizer adds BOS."""
    system, turns = _system_and_turns(chat)
    parts = [f"{system}\n"] if system else []
    for m in turns:
        if m["role"] == "user":
            parts.append(f"<human>:{m['content'].strip()}\n<bot>:")
        else:
            parts.append(f"{m['content'].strip()}\n")
    return "".join(parts)


BAICHUAN_USER_ID = 195
BAICHUAN_ASSISTANT_ID = 196


@register_chat_format("baichuan", add_special_tokens=False)
def render_baichuan(chat: Chat, tok) -> str:
    """Baichuan-13B-Chat / Baichuan2-Chat (and DISC-MedLLM): the system text, then the reserved
    user token (id 195) before each user turn and the assistant token (196) before each answer,
    EOS after each answer. Written as the tokenizer's strings of ids 195/196, which must be
    special (unsplittable) tokens of the tokenizer."""
    if tok is None:
        raise ConfigError("the baichuan chat format needs the model's tokenizer (ids 195/196)")
    user, assistant = tok.convert_ids_to_tokens([BAICHUAN_USER_ID, BAICHUAN_ASSISTANT_ID])
    eos = _special(tok, "eos_token", "</s>")
    system, turns = _system_and_turns(chat)
    parts = [system] if system else []
    for m in turns:
        if m["role"] == "user":
            parts.append(user + m["content"])
        else:
            parts.append(assistant + m["content"] + eos)
    return "".join(parts) + assistant
