"""Chat formats: a conversation -> a list of pieces (special tokens and text) with loss spans.

The one registry of conversation formats (:data:`FORMATS`): SFT/DPO preprocessing encodes the
pieces, evaluation (:mod:`sfmed.eval.chat_formats`) renders the generation prompt from the same
objects. A format describes *where* the supervised characters are; the encoder turns pieces into
ids. Each text piece is one tokenizer call of the format's reference code (see
:class:`ChatFormat`), special pieces are looked up as single ids, so joining the pieces' ids
gives exactly the reference ids.
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
    """Base of chat formats; subclasses implement :meth:`pieces` and :meth:`prompt_pieces`.

    One rule makes the ids exact: every text :class:`Piece` is what the format's reference code
    encodes in one tokenizer call, and every special piece is one id. HF tokenizers split added
    tokens out of a string, so for ChatML the text between two special tokens is one piece;
    SentencePiece-era code (Meta's LLaMA-2 ``chat_completion``, Chinese-Alpaca's
    ``build_dataset``, Baichuan's ``_build_chat_input``) encodes segments separately and adds
    BOS/EOS/role ids by id, so there a piece is one such segment.
    """

    name = ""
    default_system: str | None = None
    requires_alternation = False
    """True for formats whose reference asserts user/assistant alternation."""
    tokenizer_adds_bos = False
    """Evaluation renders a string: True = leave the leading BOS to the tokenizer
    (``add_special_tokens=True``), as the format's published inference code does."""

    def __init__(self, bos: str = "<s>", eos: str = "</s>", id_to_token=None):
        self.bos, self.eos = bos, eos
        self._id_to_token = id_to_token

    @property
    def specials(self) -> tuple[str, ...]:
        """The special tokens the format emits (each must be one id of the tokenizer)."""
        return (self.bos, self.eos)

    def pieces(self, turns: list[Turn], train: list[bool]) -> list[list[Piece]]:
        """The pieces of each turn (system first if any; a piece spanning two turns belongs to
        the later one, so truncation after a turn never splits a piece; a group may be empty);
        ``train[i]`` says whether turn ``i`` (an assistant turn) is supervised."""
        raise NotImplementedError

    def prompt_pieces(self, turns: list[Turn]) -> list[Piece]:
        """The pieces of a conversation that ends on a user turn, followed by what makes the
        model answer (the generation prompt)."""
        raise NotImplementedError

    def render(self, turns: list[Turn]) -> str:
        """The rendered string (what ``apply_chat_template(..., tokenize=False)`` returns)."""
        return "".join(p.text for g in self.pieces(turns, [False] * len(turns)) for p in g)

    def render_prompt(self, turns: list[Turn], *, drop_bos: bool = False) -> str:
        """The generation prompt as a string (evaluation tokenizes it); ``drop_bos`` leaves out
        a leading BOS for the tokenizer to add."""
        ps = self.prompt_pieces(turns)
        if drop_bos and ps and ps[0].special and ps[0].text == self.bos:
            ps = ps[1:]
        return "".join(p.text for p in ps)

    def with_system(self, turns: list[Turn], system: str | None) -> list[Turn]:
        """``turns`` with a leading system turn: the record's, else ``system``, else the
        template's default (no system turn when both are ``None``)."""
        if turns and turns[0].role == "system":
            return turns
        s = system if system is not None else self.default_system
        return turns if s is None else [Turn("system", s), *turns]

    # helpers for the subclasses
    def _end(self, train: bool) -> Piece:
        return Piece(self.eos, True, 0 if train else None)

    @staticmethod
    def _split_system(turns: list[Turn]) -> tuple[str | None, list[Turn]]:
        if turns and turns[0].role == "system":
            return turns[0].content, turns[1:]
        return None, turns

    @staticmethod
    def _check_roles(name: str, turns: list[Turn]) -> None:
        for i, t in enumerate(turns):
            want = "user" if i % 2 == 0 else "assistant"
            if t.role != want:
                raise ConfigError(
                    f"chat format {name}: turn {i} is {t.role!r}, expected {want!r} (the format "
                    "alternates user and assistant after an optional first system turn)"
                )


class ChatML(ChatFormat):
    """Qwen2's ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn.

    Supervised: the assistant content and its ``<|im_end|>`` (the model must learn to stop).
    Not supervised: the ``\\n`` after ``<|im_end|>``: generation stops at ``<|im_end|>`` and never
    produces it. Toolchains disagree here (LLaMA-Factory trains it, TRL's assistant masks and
    ms-swift do not); at inference it is never predicted, so training it only adds a trivial
    token to the loss. Evaluation adds no default system turn (Qwen2/2.5's templates do: give
    it as the first turn to match them).
    """

    name = "chatml"
    default_system = "You are a helpful assistant."
    start, end = "<|im_start|>", "<|im_end|>"

    _START = Piece(start, True)
    _END = (Piece(end, True), Piece(end, True, 0))  # not supervised / supervised
    _NL = Piece("\n")

    @property
    def specials(self) -> tuple[str, ...]:
        return (self.start, self.end)

    def pieces(self, turns: list[Turn], train: list[bool]) -> list[list[Piece]]:
        s, e, nl = self._START, self._END, self._NL
        return [
            [s, Piece(f"{t.role}\n{t.content}", False, len(t.role) + 1 if tr else None), e[tr], nl]
            for t, tr in zip(turns, train, strict=True)
        ]

    def prompt_pieces(self, turns: list[Turn]) -> list[Piece]:
        body = [p for g in self.pieces(turns, [False] * len(turns)) for p in g]
        return [*body, self._START, Piece("assistant\n")]


class Llama2(ChatFormat):
    """LLaMA-2-chat, exactly as Meta's ``Llama.chat_completion`` (meta-llama/llama,
    ``llama/generation.py``) builds the ids: a system turn is folded into the first user turn
    as ``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}``, then per exchange
    ``[BOS] + encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ") + [EOS]`` and for the
    last question ``[BOS] + encode(f"[INST] {user.strip()} [/INST]")``.

    Each exchange is one SentencePiece call, so its text is one piece (in the assistant's
    group). Supervised: from the space before the answer to the end, and the EOS.
    """

    name = "llama2"
    requires_alternation = True
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def _turns(self, turns: list[Turn]) -> tuple[bool, list[Turn]]:
        system, rest = self._split_system(turns)
        self._check_roles(self.name, rest)
        if system is not None and rest:
            rest = [Turn("user", self.B_SYS + system + self.E_SYS + rest[0].content), *rest[1:]]
        return system is not None, rest

    def pieces(self, turns: list[Turn], train: list[bool]) -> list[list[Piece]]:
        has_sys, rest = self._turns(turns)
        flags = train[1:] if has_sys else train
        out: list[list[Piece]] = [[]] if has_sys else []
        for i, t in enumerate(rest):
            if t.role == "user":
                out.append([Piece(self.bos, True)])
                continue
            head = f"[INST] {rest[i - 1].content.strip()} [/INST]"
            tr = flags[i]
            text = f"{head} {t.content.strip()} "
            out.append([Piece(text, False, len(head) if tr else None), self._end(tr)])
        return out

    def prompt_pieces(self, turns: list[Turn]) -> list[Piece]:
        _, rest = self._turns(turns)
        done = [p for g in self.pieces(turns[:-1], [False] * (len(turns) - 1)) for p in g]
        return [*done, Piece(self.bos, True), Piece(f"[INST] {rest[-1].content.strip()} [/INST]")]


ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)


class ChineseAlpaca(ChatFormat):
    """Chinese-Alpaca (Chinese-LLaMA-Alpaca, incl. Plus; QiZhenGPT), as its training script
    ``scripts/training/build_dataset.py`` builds the ids: ``tokenizer(source)`` (BOS added) +
    ``tokenizer(f"{output}</s>", add_special_tokens=False)`` with
    ``source = "{system}\\n\\n### Instruction:\\n{instruction}\\n\\n### Response: "`` (the
    Stanford Alpaca preamble as system). Source and answer are two tokenizer calls, so two
    pieces. Later exchanges of a multi-turn record continue with
    ``"\\n\\n### Instruction:\\n{user}\\n\\n### Response: "`` after the previous EOS (the
    published template is single-turn). Supervised: the answer and its EOS.
    """

    name = "chinese_alpaca"
    default_system = ALPACA_SYSTEM
    requires_alternation = True
    tokenizer_adds_bos = True

    def _groups(self, turns: list[Turn], train: list[bool]):
        system, rest = self._split_system(turns)
        self._check_roles(self.name, rest)
        flags = train[1:] if system is not None else train
        out: list[list[Piece]] = [[Piece(self.bos, True)]] if system is not None else []
        sys_text = system if system is not None else ALPACA_SYSTEM
        for i, t in enumerate(rest):
            if t.role == "user":
                lead = sys_text if i == 0 else ""
                g = [] if (i or system is not None) else [Piece(self.bos, True)]
                g.append(Piece(f"{lead}\n\n### Instruction:\n{t.content}\n\n### Response: "))
                out.append(g)
            else:
                tr = flags[i]
                out.append([Piece(t.content, False, 0 if tr else None), self._end(tr)])
        return out

    def pieces(self, turns: list[Turn], train: list[bool]) -> list[list[Piece]]:
        return self._groups(turns, train)

    def prompt_pieces(self, turns: list[Turn]) -> list[Piece]:
        return [p for g in self._groups(turns, [False] * len(turns)) for p in g]


class Ziya(ChatFormat):
    """Ziya (IDEA-CCNL Ziya-LLaMA-13B): the model card's prompt
    ``tokenizer('<human>:' + query.strip() + '\\n<bot>:')`` (BOS added), the answer continuing
    the same string. Per exchange ``[BOS] + encode("<human>:{user}\\n<bot>:{answer}") + [EOS]``
    (one call per exchange, as LLaMA-2 does; the published material fixes only the single-turn
    prompt); a system prompt goes first on its own line. Supervised: the answer (a token that
    joins ``:`` with the answer's first character included) and its EOS.
    """

    name = "ziya"
    human, bot = "<human>", "<bot>"
    requires_alternation = True
    tokenizer_adds_bos = True

    def _head(self, system: str | None, user: str, first: bool) -> str:
        lead = f"{system}\n" if (first and system) else ""
        return f"{lead}{self.human}:{user.strip()}\n{self.bot}:"

    def pieces(self, turns: list[Turn], train: list[bool]) -> list[list[Piece]]:
        system, rest = self._split_system(turns)
        self._check_roles(self.name, rest)
        flags = train[1:] if system is not None else train
        out: list[list[Piece]] = [[]] if system is not None else []
        for i, t in enumerate(rest):
            if t.role == "user":
                out.append([Piece(self.bos, True)])
                continue
            head = self._head(system, rest[i - 1].content, i == 1)
            tr = flags[i]
            text = head + t.content.strip()
            out.append([Piece(text, False, len(head) if tr else None), self._end(tr)])
        return out

    def prompt_pieces(self, turns: list[Turn]) -> list[Piece]:
        system, rest = self._split_system(turns)
        done = [p for g in self.pieces(turns[:-1], [False] * (len(turns) - 1)) for p in g]
        head = self._head(system, rest[-1].content, len(rest) == 1)
        return [*done, Piece(self.bos, True), Piece(head)]


class ChiMed(Ziya):
    """ChiMed-GPT (SYNLP/ChiMed-GPT-1.0, on Ziya-v2): Ziya's layout with the tags its model
    card's example uses, ``[human]:{query}\\n[bot]:``."""

    name = "chimed"
    human, bot = "[human]", "[bot]"


BAICHUAN_USER_ID = 195
BAICHUAN_ASSISTANT_ID = 196


class Baichuan(ChatFormat):
    """Baichuan-13B-Chat (and DISC-MedLLM, fine-tuned from Baichuan-13B in this format), as its
    ``_build_chat_input`` (modeling_baichuan.py) builds the ids: ``[195] + encode(user)`` per user
    turn, ``[196] + encode(answer) + [EOS]`` per answer, and ``[196]`` to prompt; every content is
    its own tokenizer call (the tokenizer adds no BOS). The reserved ids 195/196 are written as
    the tokenizer's tokens at those ids. A system prompt is encoded first, as Baichuan2's
    ``build_chat_input`` does (13B-Chat's code has no system role). Supervised: each answer and
    its EOS; not the role ids.
    """

    name = "baichuan"

    def __init__(self, bos: str = "<s>", eos: str = "</s>", id_to_token=None):
        super().__init__(bos, eos, id_to_token)
        if id_to_token is None:
            raise ConfigError(
                "the baichuan chat format needs the model's tokenizer (ids 195/196 are its "
                "user/assistant tokens)"
            )
        self.user = id_to_token(BAICHUAN_USER_ID)
        self.assistant = id_to_token(BAICHUAN_ASSISTANT_ID)
        if not self.user or not self.assistant:
            raise ConfigError(
                "the baichuan chat format needs token ids 195/196 (user/assistant) in the "
                "tokenizer; this tokenizer has none there"
            )

    @property
    def specials(self) -> tuple[str, ...]:
        return (self.user, self.assistant, self.eos)

    def pieces(self, turns: list[Turn], train: list[bool]) -> list[list[Piece]]:
        out = []
        for t, tr in zip(turns, train, strict=True):
            if t.role == "system":
                out.append([Piece(t.content)] if t.content else [])
            elif t.role == "user":
                out.append([Piece(self.user, True), Piece(t.content)])
            else:
                tf = 0 if tr else None
                out.append(
                    [Piece(self.assistant, True), Piece(t.content, False, tf), self._end(tr)]
                )
        return out

    def prompt_pieces(self, turns: list[Turn]) -> list[Piece]:
        body = [p for g in self.pieces(turns, [False] * len(turns)) for p in g]
        return [*body, Piece(self.assistant, True)]


FORMATS: dict[str, type[ChatFormat]] = {
    f.name: f for f in (ChatML, Llama2, ChineseAlpaca, Ziya, ChiMed, Baichuan)
}
"""The one registry of conversation formats, used by SFT/DPO preprocessing and evaluation."""


def make_format(name: str, *, bos=None, eos=None, id_to_token=None) -> ChatFormat:
    """The format ``name`` bound to a tokenizer's BOS/EOS strings and id lookup."""
    if name not in FORMATS:
        raise ConfigError(f"chat format {name!r} is not one of {sorted(FORMATS)}")
    return FORMATS[name](bos or "<s>", eos or "</s>", id_to_token)


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
    return lambda msgs, bos, eos: tpl.render(
        messages=msgs, add_generation_prompt=False, bos_token=bos, eos_token=eos
    )


def _family_format(tokenizer_dir: str | Path) -> str | None:
    """The chat format of the model family whose ``config.json`` sits beside the tokenizer."""
    import json

    d = Path(tokenizer_dir)
    cfg = (d if d.is_dir() else d.parent) / "config.json"
    if not cfg.is_file():
        return None
    model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    from sfmed.models import get_family, registered_families

    if model_type not in registered_families():
        return None
    return get_family(model_type).chat_format


def resolve_format(name: str, tokenizer_dir: str | Path, tokenizer=None) -> ChatFormat:
    """The chat format for ``chat.template=name``, bound to the tokenizer's special tokens.

    ``auto``: ChatML when the tokenizer's chat_template is ChatML, LLaMA-2 when it is
    ``[INST]``, else the default of the model family named by the ``config.json`` beside the
    tokenizer (``ModelFamily.chat_format``). With the tokenizer's own template, check that our
    rendering equals ``apply_chat_template(tokenize=False)`` on probe conversations (with and
    without a system turn) before any work, so a template we do not reproduce fails loudly.
    ``tokenizer``: a loaded :func:`sfmed.data.tokenizer.load_tokenizer` (loaded here if needed).
    """
    template = chat_template_of(tokenizer_dir)
    if name == "auto":
        if template is not None:
            name = (
                "chatml" if "<|im_start|>" in template else "llama2" if "[INST]" in template else ""
            )
        else:
            name = _family_format(tokenizer_dir) or ""
        if not name:
            why = (
                "its chat_template is not one sfmed knows"
                if template
                else ("it has no chat_template and no model config.json beside it")
            )
            raise ConfigError(
                f"chat.template=auto cannot choose a format for the tokenizer at {tokenizer_dir}: "
                f"{why}; set chat.template to one of {sorted(FORMATS)}"
            )
    if name not in FORMATS:
        raise ConfigError(f"chat.template={name!r} is not one of {['auto', *sorted(FORMATS)]}")
    if name == "chatml":
        fmt: ChatFormat = ChatML()
    else:
        if tokenizer is None:
            from sfmed.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_dir, with_hash=False)
        fmt = make_format(
            name,
            bos=tokenizer.bos_token,
            eos=tokenizer.eos_token,
            id_to_token=tokenizer.id_to_token,
        )
    if template is not None:
        render = _jinja(template)
        for given, turns in (
            (_PROBE, fmt.with_system(_PROBE, None)),
            ([Turn("system", "你是医生。"), *_PROBE],) * 2,
        ):
            msgs = [{"role": t.role, "content": t.content} for t in given]
            want = render(msgs, fmt.bos, fmt.eos)
            if want != fmt.render(turns):
                raise ConfigError(
                    f"chat.template={name}: the tokenizer's chat_template at {tokenizer_dir} "
                    f"renders differently ({want[:120]!r}); choose the matching chat.template"
                )
    return fmt
