"""Tokenizer backends for preprocessing: gigatoken where it supports the tokenizer, else the
reference libraries (HF ``tokenizers`` for ``tokenizer.json``, ``sentencepiece`` for ``.model``).

Every backend returns, for a batch of texts, one flat id array plus document offsets, and the
ids equal ``tokenizer.encode(text, add_special_tokens=False)`` (HF) or ``sp.encode(text)``
(SentencePiece) exactly; tests compare them. gigatoken refuses (raises on load) the tokenizers it
cannot reproduce exactly (WordPiece/Unigram models, unsupported normalizers/pre-tokenizers), and
``auto`` then falls back to the reference library.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfmed.core.errors import UserError
from sfmed.data.metadata import tokenizer_file_digest, tokenizer_files, tokenizer_hash

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "gigatoken", "hf", "sentencepiece")


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be loaded or used as asked."""


@dataclass
class TokenizerInfo:
    """What the outputs record about the tokenizer (the sidecar's ``tokenizer`` entry)."""

    path: str
    kind: str  # hf | sentencepiece
    backend: str  # gigatoken | hf | sentencepiece
    hash: str | None  # tokenizer_hash (None until computed when loaded with_hash=False)
    file_digest: str  # tokenizer_file_digest
    vocab_size: int
    eod_id: int
    eod_token: str
    fallback_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return dict(self.__dict__)


@dataclass
class Tokenizer:
    """A loaded backend: ``encode_flat(texts) -> (ids, offsets)`` plus its identity."""

    info: TokenizerInfo
    _encode: Callable[[list[str]], tuple[np.ndarray, np.ndarray]] = field(repr=False)
    _vocab: Any = field(default=None, repr=False)  # the reference library's tokenizer
    bos_token: str | None = None
    eos_token: str | None = None

    def _ref(self):
        if self._vocab is None:  # gigatoken loaded: the reference library for look-ups
            self._vocab = _load_hf(Path(self.info.path))
        return self._vocab

    def token_id(self, token: str) -> int | None:
        """The id of ``token`` as one vocabulary entry (special/added tokens included), or None."""
        ref = self._ref()
        if self.info.kind == "sentencepiece":
            i = ref.piece_to_id(token)
            return i if ref.id_to_piece(i) == token else None
        return ref.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        """The token string of id ``i``, or None when out of range."""
        ref = self._ref()
        if self.info.kind == "sentencepiece":
            return ref.id_to_piece(i) if 0 <= i < ref.get_piece_size() else None
        return ref.id_to_token(i)

    def char_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Ids of ``text`` (reference library) and the character offset where each token ends."""
        ref = self._ref()
        if self.info.kind == "sentencepiece":
            pieces = ref.encode(text, return_type="proto").pieces
            # sentencepiece's offsets are UTF-8 byte offsets: map them to characters.
            char_at = np.zeros(len(text.encode("utf-8")) + 1, np.int64)
            pos = 0
            for k, ch in enumerate(text):
                n = len(ch.encode("utf-8"))
                char_at[pos + 1 : pos + n + 1] = k + 1
                pos += n
            return [p.id for p in pieces], [int(char_at[p.end]) for p in pieces]
        enc = ref.encode(text, add_special_tokens=False)
        return list(enc.ids), [e for _, e in enc.offsets]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode ``texts``; return the ids of all documents back to back and the ``len+1``
        offsets (document ``i`` is ``ids[offsets[i]:offsets[i+1]]``). No EOD is added."""
        if not texts:
            return np.zeros(0, np.int64), np.zeros(1, np.int64)
        return self._encode(list(texts))


def _flatten(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(offsets[-1]))
    return ids, offsets


def _awkward_flat(arr) -> tuple[np.ndarray, np.ndarray]:
    layout = arr.layout
    offsets = np.asarray(layout.offsets)
    data = np.asarray(layout.content.data)
    start, stop = int(offsets[0]), int(offsets[-1])
    return data[start:stop], offsets - start if start else offsets


def _hf_eos_token(path: Path, key: str = "eos_token") -> str | None:
    d = path if path.is_dir() else path.parent
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = d / name
        if f.is_file():
            try:
                eos = json.loads(f.read_text(encoding="utf-8")).get(key)
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and eos:
                return eos
    return None


def _load_gigatoken(path: Path, kind: str, model_file: Path):
    import gigatoken

    if kind == "sentencepiece":
        return gigatoken.Tokenizer.from_sentencepiece(model_file)
    return gigatoken.Tokenizer(str(path))


def _gigatoken_encoder(tok) -> Callable:
    def enc(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return _awkward_flat(tok.encode_batch(texts))

    return enc


def _load_hf(path: Path):
    """A ``tokenizers.Tokenizer`` for an HF folder or tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer

    f = path if path.is_file() else path / "tokenizer.json"
    if f.is_file():
        return HFTokenizer.from_file(str(f))
    # Only vocab.json + merges.txt (a "slow" tokenizer): let transformers build the fast one.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), use_fast=True).backend_tokenizer


def _hf_encoder(tok) -> Callable:
    def enc(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return _flatten([e.ids for e in tok.encode_batch(texts, add_special_tokens=False)])

    return enc


def _sp_encoder(sp) -> Callable:
    def enc(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return _flatten(sp.encode(texts))

    return enc


def reference_encoder(path: str | os.PathLike) -> Callable[[str], list[int]]:
    """``text -> ids`` with the reference library: HF ``tokenizers`` ``encode(text,
    add_special_tokens=False)`` or ``sentencepiece`` ``encode(text)``."""
    kind, files = tokenizer_files(path)
    if kind == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(files[0]))
        return lambda text: list(sp.encode(text))
    tok = _load_hf(Path(path))
    return lambda text: list(tok.encode(text, add_special_tokens=False).ids)


def load_tokenizer(
    path: str | os.PathLike,
    backend: str = "auto",
    eod_token: str | None = None,
    with_hash: bool = True,
) -> Tokenizer:
    """Load the tokenizer at ``path`` with ``backend`` (auto | gigatoken | hf | sentencepiece).

    ``with_hash=False`` leaves ``info.hash`` to the caller (it parses the whole tokenizer.json,
    ~0.1 s for Qwen2, which preprocessing computes while the first chunks are encoded).
    """
    if backend not in BACKENDS:
        raise TokenizerError(f"tokenizer_backend={backend!r} is not one of {list(BACKENDS)}")
    p = Path(path)
    try:
        kind, files = tokenizer_files(p)
    except FileNotFoundError as e:
        raise TokenizerError(str(e)) from None
    if backend == "hf" and kind != "hf":
        raise TokenizerError(f"tokenizer_backend=hf needs an HF tokenizer folder, got {p}")
    if backend == "sentencepiece" and kind != "sentencepiece":
        raise TokenizerError(f"tokenizer_backend=sentencepiece needs a .model file, got {p}")

    fallback = None
    enc = None
    used = backend
    gt = None
    if backend in ("auto", "gigatoken"):
        try:
            gt = _load_gigatoken(p, kind, files[0])
            enc, used = _gigatoken_encoder(gt), "gigatoken"
        except Exception as e:  # gigatoken raises RuntimeError/ValueError for what it lacks
            if backend == "gigatoken":
                raise TokenizerError(
                    f"gigatoken cannot load {p}: {e}. Use tokenizer_backend=auto to fall back to "
                    "the reference library."
                ) from e
            fallback = str(e).strip().splitlines()[0]
            logger.info(
                "gigatoken does not support %s (%s); using the reference library", p, fallback
            )

    hf = sp = None
    if kind == "hf":
        if enc is None:
            hf = _load_hf(p)
            enc, used = _hf_encoder(hf), "hf"
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(files[0]))
        if enc is None:
            enc, used = _sp_encoder(sp), "sentencepiece"

    # Vocabulary size and EOD come from the reference description of the tokenizer.
    if kind == "sentencepiece":
        vocab_size = sp.get_piece_size()
        if eod_token is None:
            eod_id = sp.eos_id()
            if eod_id < 0:
                raise TokenizerError(
                    f"{p} defines no eos piece; pass eod_token=<piece> to choose the EOD"
                )
            eod_token = sp.id_to_piece(eod_id)
        else:
            eod_id = sp.piece_to_id(eod_token)
            if eod_id == sp.unk_id() and eod_token != sp.id_to_piece(sp.unk_id()):
                raise TokenizerError(f"eod_token={eod_token!r} is not a piece of {p}")
    else:
        if gt is not None:
            vocab_size = int(gt.vocab_size)
            lookup = _gigatoken_lookup(gt)
        else:
            vocab_size = int(hf.get_vocab_size(with_added_tokens=True))
            lookup = hf.token_to_id
        if eod_token is None:
            for cand in ("<|endoftext|>", None):
                cand = cand or _hf_eos_token(p)  # read tokenizer_config.json only if needed
                if cand and lookup(cand) is not None:
                    eod_token = cand
                    break
            else:
                raise TokenizerError(
                    f"{p} has neither <|endoftext|> nor an eos_token; pass eod_token=<token>"
                )
        eod_id = lookup(eod_token)
        if eod_id is None:
            raise TokenizerError(f"eod_token={eod_token!r} is not a token of {p}")

    info = TokenizerInfo(
        path=str(p.resolve()),
        kind=kind,
        backend=used,
        hash=tokenizer_hash(p) if with_hash else None,
        file_digest=tokenizer_file_digest(p),
        vocab_size=int(vocab_size),
        eod_id=int(eod_id),
        eod_token=str(eod_token),
        fallback_reason=fallback,
    )
    if kind == "sentencepiece":
        bos = sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
        eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
    else:
        bos, eos = _hf_eos_token(p, "bos_token"), _hf_eos_token(p)
    return Tokenizer(
        info=info, _encode=enc, _vocab=sp if sp is not None else hf, bos_token=bos, eos_token=eos
    )


def _gigatoken_lookup(gt) -> Callable[[str], int | None]:
    """token string -> id: a string that encodes to exactly one id is that token (gigatoken, like
    HF, matches added/special tokens in text)."""

    def lookup(token: str) -> int | None:
        ids = gt.encode(token)
        return int(ids[0]) if len(ids) == 1 else None

    return lookup
