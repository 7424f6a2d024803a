"""Turns -> token ids + loss mask, with the chat format's pieces and the fast tokenizer backend.

Fast path: the text pieces of a whole batch of conversations (cut only at special tokens, see
:mod:`sfmed.data.chat.formats`) go through one ``encode_flat`` call of the preprocessing
backend (gigatoken where it supports the tokenizer; ids equal HF ``tokenizers``), special tokens
are looked up, and the ids are joined. The result equals ``apply_chat_template(messages)``
(tests check it on the real Qwen2 tokenizer).

The loss mask is decided by role span, never by token id: in a supervised piece, the tokens that
hold any character at or after ``train_from`` are trained. The ids of the piece's head
(``assistant\\n``) are looked up once; when they are a prefix of the piece's ids, the rest is
exactly the content. Otherwise (a token merging head and content, which Qwen2's pre-tokenizer
never produces for stripped content) the character offsets of HF ``tokenizers`` decide.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfmed.core.errors import ConfigError
from sfmed.data.chat.formats import ChatFormat, Piece, Turn
from sfmed.data.chat.turns import BadRecord


@dataclass
class Encoded:
    """One encoded conversation: ``ids``, ``mask`` (1 = supervised target token) and
    ``turn_ends`` (number of tokens up to the end of each turn)."""

    ids: np.ndarray
    mask: np.ndarray
    turn_ends: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def cut(self, n: int) -> Encoded:
        """The first ``n`` tokens."""
        return Encoded(self.ids[:n], self.mask[:n], self.turn_ends[self.turn_ends <= n])


class ChatEncoder:
    """Encode conversations with a chat format and a preprocessing tokenizer
    (:func:`sfmed.data.tokenizer.load_tokenizer`)."""

    def __init__(
        self,
        tokenizer,
        fmt: ChatFormat,
        *,
        mask: str = "all",
        system_prompt: str | None = None,
        require_alternation: bool = True,
        tokenizer_path: str | Path | None = None,
    ):
        self.tok, self.fmt, self.mask_mode = tokenizer, fmt, mask
        self.system_prompt = system_prompt
        self.alternate = require_alternation or fmt.requires_alternation
        self.tokenizer_path = tokenizer_path or tokenizer.info.path
        self.special_ids: dict[str, int] = {}
        for s in fmt.specials:
            i = tokenizer.token_id(s)
            if i is None:
                raise ConfigError(
                    f"chat format {fmt.name} needs {s!r} as one token, but the tokenizer at "
                    f"{self.tokenizer_path} has no such token; choose the matching chat.template"
                )
            self.special_ids[s] = int(i)
        # Texts that recur in every conversation (separators, heads, the default system turn).
        self._cache: dict[str, np.ndarray] = {}  # ids of the heads of supervised pieces
        self._lock = threading.RLock()

    # -- validation -------------------------------------------------------------------------

    def prepare(self, turns: list[Turn], *, final: str = "assistant") -> list[Turn]:
        """The turns with the system turn added, checked; raise :class:`BadRecord`.
        ``final='user'`` checks a preference prompt (it must end on a user turn)."""
        turns = self.fmt.with_system(turns, self.system_prompt)
        prev = None
        has_assistant = False
        for i, t in enumerate(turns):
            if t.role == "system":
                if i:
                    raise BadRecord("misplaced_system", f"system turn at position {i}")
                continue
            for s in self.fmt.specials:
                if s in t.content:
                    raise BadRecord("special_token", f"{t.role} turn contains {s!r}")
            if t.role == "user" and not t.content:
                raise BadRecord("empty_user", f"empty user turn at position {i}")
            if t.role == "assistant":
                if not t.content:
                    raise BadRecord("empty_assistant", f"empty assistant turn at position {i}")
                if prev is None:
                    raise BadRecord("starts_on_assistant", "the first turn is the assistant's")
                has_assistant = True
            if self.alternate and t.role == prev:
                raise BadRecord("consecutive_turns", f"two {t.role} turns in a row at {i}")
            prev = t.role
        if final == "assistant":
            if not has_assistant:
                raise BadRecord("no_assistant", "no assistant turn")
            if prev != "assistant":
                raise BadRecord("ends_on_user", "the conversation ends on a user turn")
        elif prev != "user":
            raise BadRecord("prompt_not_on_user", "the prompt does not end on a user turn")
        return turns

    def train_flags(self, turns: list[Turn], mask: str | None = None) -> list[bool]:
        """Which turns are supervised under ``mask`` (default: the encoder's mode)."""
        flags = [t.role == "assistant" for t in turns]
        if (mask or self.mask_mode) == "last":
            last = max(i for i, f in enumerate(flags) if f) if any(flags) else -1
            flags = [i == last for i in range(len(turns))]
        return flags

    # -- encoding ---------------------------------------------------------------------------

    def _head(self, text: str) -> np.ndarray:
        ids = self._cache.get(text)
        if ids is None:
            ids, _ = self.tok.encode_flat([text])
            ids = self._cache[text] = ids.astype(np.int64)
        return ids

    def encode(self, convs: list[list[Turn]], train: list[list[bool]]) -> list[Encoded]:
        """Encode prepared conversations (``train[k][i]``: turn ``i`` of ``k`` supervised).

        Every distinct text piece of the batch is tokenized once (separators, system prompts and
        heads recur in every conversation); the conversations are then gathered with numpy.
        Thread-safe (calls are serialised).
        """
        if not convs:
            return []
        with self._lock:
            return self._encode(convs, train)

    def _encode(self, convs: list[list[Turn]], train: list[list[bool]]) -> list[Encoded]:
        spec_code = {t: k for k, t in enumerate(self.special_ids)}
        n_spec = len(spec_code)
        index: dict[tuple[str, int | None], int] = {}
        texts: list[str] = []
        supervised: list[tuple[int, Piece]] = []
        src: list[int] = []  # per piece: text index, or -1 - special code
        turn_last: list[int] = []  # index of the last piece of every turn
        n_turns: list[int] = []
        for turns, flags in zip(convs, train, strict=True):
            groups = self.fmt.pieces(turns, flags)
            n_turns.append(len(groups))
            for g in groups:
                for p in g:
                    if p.special:
                        # Supervised specials come from the second half of the special pool.
                        code = spec_code[p.text] + (n_spec if p.train_from is not None else 0)
                        src.append(-1 - code)
                        continue
                    key = (p.text, p.train_from)
                    j = index.get(key)
                    if j is None:
                        j = index[key] = len(texts)
                        texts.append(p.text)
                        if p.train_from is not None:
                            supervised.append((j, p))
                    src.append(j)
                turn_last.append(len(src) - 1)
        ids, offs = self.tok.encode_flat(texts)
        n_text = ids.shape[0]
        spec_ids = np.array(list(self.special_ids.values()) * 2, np.int64)
        all_ids = np.concatenate([ids.astype(np.int64, copy=False), spec_ids])
        all_mask = np.zeros(all_ids.shape[0], np.uint8)
        all_mask[n_text + n_spec :] = 1
        for j, p in supervised:
            a, b = int(offs[j]), int(offs[j + 1])
            all_mask[a:b] = self._piece_mask(p, ids[a:b])
        ps = np.asarray(src, np.int64)
        special = ps < 0
        j = np.where(special, 0, ps)
        starts = np.where(special, n_text - 1 - ps, offs[j])
        lens = np.where(special, 1, offs[j + 1] - offs[j])
        out_end = np.cumsum(lens)
        gather = np.repeat(starts - (out_end - lens), lens) + np.arange(int(out_end[-1]))
        flat_ids, flat_mask = all_ids[gather], all_mask[gather]
        # Conversation and turn boundaries, from the pieces' ends (an empty group ends where
        # the previous piece ends: index -1 -> 0).
        ends = np.concatenate([[0], out_end])[np.asarray(turn_last, np.int64) + 1]
        conv_turns = np.cumsum(n_turns)
        conv_end = ends[conv_turns - 1].tolist()
        out, a = [], 0
        for b, te in zip(conv_end, np.split(ends, conv_turns[:-1]), strict=True):
            out.append(Encoded(flat_ids[a:b], flat_mask[a:b], te - a))
            a = b
        return out

    def _piece_mask(self, p: Piece, pid: np.ndarray) -> np.ndarray:
        n = pid.shape[0]
        head = self._head(p.text[: p.train_from])
        k = head.shape[0]
        m = np.zeros(n, np.uint8)
        if n >= k and (pid[:k] == head).all():
            m[k:] = 1
            return m
        # A token spans the head and the content: decide by character offsets.
        ref_ids, ends = self.tok.char_offsets(p.text)
        if ref_ids != pid.tolist():
            raise RuntimeError("tokenizer backends disagree on a chat piece; report this input")
        for i, end in enumerate(ends):
            m[i] = end > p.train_from
        return m

    # -- over-long conversations ------------------------------------------------------------

    def fit(self, turns: list[Turn], enc: Encoded, limit: int) -> Encoded | None:
        """``enc`` cut after the last whole assistant turn that fits in ``limit`` tokens
        (re-encoded when ``mask=last`` so that the kept final turn is the supervised one);
        None when not even the first answer fits."""
        if len(enc) <= limit:
            return enc
        keep = [
            i for i, t in enumerate(turns) if t.role == "assistant" and enc.turn_ends[i] <= limit
        ]
        if not keep:
            return None
        cut = turns[: keep[-1] + 1]
        if self.mask_mode == "last":
            return self.encode([cut], [self.train_flags(cut)])[0]
        return enc.cut(int(enc.turn_ends[keep[-1]]))
