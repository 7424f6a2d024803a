"""Schema of chat preprocessing (``launch/preprocess.py format=sft|preference``).

``ChatOptions`` says, per source, where the turns of a record are (``sources.<name>.turns.*``; it complements the reader
options of :mod:`sfmed.config.data`); ``ChatDataConfig`` holds the run-wide settings: chat format,
sequence length, loss-mask mode, over-long handling and packing. Validation runs in
``__post_init__`` so a bad value fails before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sfmed.core.errors import Problems

FORMATS = ("pretrain", "sft", "preference")
# The names of sfmed.data.chat.formats.FORMATS (a test checks they agree; listed here so that the
# schema imports nothing).
CHAT_FORMATS = ("auto", "chatml", "llama2", "chinese_alpaca", "ziya", "chimed", "baichuan")
MASK_MODES = ("all", "last")
OVERFLOW = ("truncate", "drop")

# Role names seen in the corpora -> the chat roles. ``None`` drops the message.
DEFAULT_CHAT_ROLES: dict[str, str | None] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "patient": "user",
    "病人": "user",
    "患者": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "doctor": "assistant",
    "医生": "assistant",
}


@dataclass
class ChatOptions:
    """Where the turns of a record are (per source, ``sources.<name>.turns.*``).

    The conversation shape follows the source's ``render``: ``dialogue`` (a message list),
    ``history`` (CMtMedQA ``history`` + last turn), ``template`` (one question/answer pair built
    from fields). Preference records are recognised by their keys (see ``docs/sft.md``).
    """

    prompt: list[str] | None = None
    """render=template: the fields that form the user turn, joined by ``join`` (empty ones left
    out). Default: every placeholder of ``template`` but the last."""

    response: str | None = None
    """render=template: the field holding the assistant answer. Default: the last placeholder of
    ``template``."""

    system: str | None = None
    """Record field (dotted path) with a per-sample system prompt; absent/empty = the run's
    ``chat.system_prompt``."""

    roles: dict[str, str | None] = field(default_factory=dict)
    """render=dialogue: role name -> ``user`` | ``assistant`` | ``system`` (``null`` drops that
    role's messages), merged over the defaults (human/patient -> user, gpt/doctor/bot -> assistant)."""

    chosen: str | None = None
    """format=preference: field of the chosen answer (default: ``chosen`` or ``response_chosen``)."""

    rejected: str | None = None
    """format=preference: field of the rejected answer (default: ``rejected`` or
    ``response_rejected``)."""

    def __post_init__(self):
        p = Problems()
        for k, v in (self.roles or {}).items():
            if v is not None and v not in ("user", "assistant", "system"):
                p.add(f"turns.roles.{k}={v!r} must be user, assistant, system or null (drop)")
        p.raise_if_any()


@dataclass
class ChatDataConfig:
    """Run-wide settings of ``format=sft|preference`` (``chat.*`` on the command line)."""

    template: str = "auto"
    """Chat format: ``auto`` (recognised from the tokenizer's ``chat_template``, else the default
    of the model family whose ``config.json`` sits beside the tokenizer; a rendering is checked
    against the tokenizer's ``apply_chat_template`` before any work) | ``chatml`` (Qwen2/2.5/3) |
    ``llama2`` (LLaMA-2-chat ``[INST]``) | ``chinese_alpaca`` (Chinese-Alpaca, QiZhenGPT) |
    ``ziya`` (``<human>:``/``<bot>:``) | ``chimed`` (ChiMed-GPT ``[human]:``/``[bot]:``) |
    ``baichuan`` (Baichuan-13B-Chat, DISC-MedLLM: reserved ids 195/196)."""

    system_prompt: str | None = None
    """System prompt for conversations without one; ``null`` = the template's default (ChatML:
    ``You are a helpful assistant.``; chinese_alpaca: the Alpaca preamble; others: none);
    ``""`` = an empty system turn."""

    seq_length: int = 4096
    """Longest sequence (tokens) training sees: a conversation, a preference pair's side, or a
    pack."""

    mask: str = "all"
    """Which assistant turns are supervised: ``all`` (default) | ``last`` (only the final one)."""

    overflow: str = "truncate"
    """A conversation longer than ``seq_length``: ``truncate`` at a turn boundary (keeping whole
    assistant turns; counted ``truncated``) or ``drop`` it (reason ``too_long``)."""

    pack: bool = True
    """Pack several conversations (or pairs) into each ``seq_length`` sequence (best-fit
    decreasing), storing the boundaries; false = one conversation (pair) per sample."""

    require_alternation: bool = True
    """Count two user (or two assistant) turns in a row as a bad record (``consecutive_turns``);
    templates that forbid it (LLaMA-2) enforce it whatever this says."""

    batch_size: int = 2048
    """Records encoded per tokenizer call."""

    def __post_init__(self):
        p = Problems()
        p.choice("chat.template", self.template, CHAT_FORMATS)
        p.choice("chat.mask", self.mask, MASK_MODES)
        p.choice("chat.overflow", self.overflow, OVERFLOW)
        if self.seq_length < 16:
            p.add(f"chat.seq_length={self.seq_length} must be >= 16")
        if self.batch_size < 1:
            p.add(f"chat.batch_size={self.batch_size} must be >= 1")
        p.raise_if_any()
