"""On-disk format of chat data and its torch-free readers.

A dataset ``<prefix>`` is three files (written atomically, the sidecar last):

- ``<prefix>.bin/.idx``: a Megatron indexed dataset of token ids. Each *sequence* is one encoded
  conversation (SFT) or one side of a pair (preference: chosen, then rejected); each *document*
  is one training sample: a pack of sequences (``pack=true``), or one conversation / one pair.
  megatron-core's ``IndexedDataset`` reads it (``sequence_lengths``, ``document_indices``).
- ``<prefix>_mask.bin/.idx``: the loss mask, ``uint8``, in the same layout: 1 where the token is a
  supervised *target* (assistant content and its end-of-turn token).
- ``<prefix>.json``: the sidecar (kind, seq_length, chat format, mask mode, tokenizer, stats).

:class:`SFTDataset` / :class:`PreferenceDataset` return samples ready for a trainer: labels and
loss mask are shifted within each sequence, so no label crosses a boundary (the last token of a
conversation predicts nothing), position ids restart per sequence, and ``cu_seqlens`` gives the
boundaries for packed attention (THD / block-diagonal masks).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from sfmed.core.atomic import atomic_write_text
from sfmed.data.indexed import _CODE_DTYPES, BulkIndexedWriter, bin_path, idx_path, remove_outputs

IGNORE_INDEX = -100
"""Label of positions that predict nothing (sequence ends), as HF/PyTorch cross-entropy expect."""


def mask_prefix(prefix: str | os.PathLike) -> Path:
    """``<prefix>_mask``: the companion loss-mask dataset."""
    return Path(f"{os.fspath(prefix)}_mask")


def complete_meta(prefix: str | os.PathLike) -> dict | None:
    """The sidecar of a complete chat dataset (all four files present with the sizes it
    records), else None."""
    side = Path(f"{os.fspath(prefix)}.json")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for p, pre in ((prefix, ""), (mask_prefix(prefix), "mask_")):
        for f, key in ((bin_path(p), "bin_bytes"), (idx_path(p), "idx_bytes")):
            if not f.is_file() or f.stat().st_size != meta.get(pre + key):
                return None
    return meta


def remove_chat_outputs(prefix: str | os.PathLike) -> None:
    """Delete a chat dataset (sidecar first)."""
    remove_outputs(prefix)
    remove_outputs(mask_prefix(prefix))


class ChatWriter:
    """Write sequences grouped into samples; ``finish()`` renames everything into place."""

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype):
        self.prefix = Path(prefix)
        remove_chat_outputs(self.prefix)
        self.ids = BulkIndexedWriter(self.prefix, dtype)
        self.mask = BulkIndexedWriter(mask_prefix(self.prefix), np.uint8)
        self.doc_idx = [0]
        self.n_seq = 0

    def add_sample(self, ids: list[np.ndarray], masks: list[np.ndarray]) -> None:
        """One sample made of the given sequences."""
        lengths = np.fromiter((x.shape[0] for x in ids), np.int64, len(ids))
        self.ids.add_chunk(np.concatenate(ids), lengths)
        self.mask.add_chunk(np.concatenate(masks), lengths)
        self.n_seq += len(ids)
        self.doc_idx.append(self.n_seq)

    def finish(self, meta: dict) -> None:
        """Write both datasets, then the sidecar (its presence marks a complete dataset)."""
        d = np.asarray(self.doc_idx, np.int64)
        self.mask.finish(d)
        self.ids.finish(d)
        sizes = {
            "bin_bytes": self.ids.bin_bytes,
            "idx_bytes": self.ids.idx_bytes,
            "mask_bin_bytes": self.mask.bin_bytes,
            "mask_idx_bytes": self.mask.idx_bytes,
        }
        text = json.dumps({**meta, **sizes}, ensure_ascii=False, indent=1)
        atomic_write_text(f"{self.prefix}.json", text)

    def abort(self) -> None:
        """Remove the temporary files."""
        self.ids.abort()
        self.mask.abort()


class _Indexed:
    """A Megatron ``.bin/.idx`` pair read with numpy (no torch, no megatron import)."""

    def __init__(self, prefix: str | os.PathLike):
        p = idx_path(prefix)
        with open(p, "rb") as f:
            head = f.read(34)
        if len(head) < 34 or head[:9] != b"MMIDIDX\x00\x00":
            raise ValueError(f"{p} is not a Megatron .idx file")
        self.dtype = _CODE_DTYPES[head[17]]
        n_seq, n_doc = struct.unpack("<QQ", head[18:34])
        idx = np.memmap(p, mode="r", dtype=np.uint8)
        o = 34
        self.lengths = np.frombuffer(idx, np.int32, n_seq, o).astype(np.int64)
        o += 4 * n_seq
        self.pointers = np.frombuffer(idx, np.int64, n_seq, o)
        o += 8 * n_seq
        self.doc_idx = np.frombuffer(idx, np.int64, n_doc, o)
        size = os.path.getsize(bin_path(prefix))
        self.bin = (
            np.memmap(bin_path(prefix), mode="r", dtype=self.dtype)
            if size
            else np.zeros(0, self.dtype)
        )

    def span(self, doc: int) -> tuple[int, int, np.ndarray]:
        """Token range and sequence lengths of document ``doc``."""
        a, b = int(self.doc_idx[doc]), int(self.doc_idx[doc + 1])
        if a == b:
            return 0, 0, self.lengths[a:b]
        start = int(self.pointers[a]) // self.dtype.itemsize
        lens = self.lengths[a:b]
        return start, start + int(lens.sum()), lens


class ChatDataset:
    """Samples of a chat dataset written by ``launch/preprocess.py format=sft|preference``.

    ``ds[i]`` is a dict of numpy arrays for sample ``i`` (a pack, or one conversation / pair):

    - ``tokens`` (int64, T): input ids, sequences back to back, no padding;
    - ``labels`` (int64, T): the next token within the same sequence, ``-100`` at sequence ends;
    - ``loss_mask`` (float32, T): 1 where ``labels`` is a supervised target;
    - ``position_ids`` (int64, T): restarting at 0 for every sequence;
    - ``cu_seqlens`` (int32, S+1): sequence boundaries (``cu_seqlens[k]`` = start of sequence k);
    - ``seq_lengths`` (int64, S).

    ``pad(sample, length, pad_id)`` extends a sample to a fixed length for batching. The sidecar
    is ``ds.meta``; ``ds.seq_length`` the sequence length the data was prepared for.
    """

    kind = ""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        side = Path(f"{self.prefix}.json")
        if not side.is_file():
            raise FileNotFoundError(
                f"{side} not found: {self.prefix} is not a complete chat dataset (run "
                "launch/preprocess.py format=sft|preference)"
            )
        self.meta = json.loads(side.read_text(encoding="utf-8"))
        if self.kind and self.meta.get("kind") != self.kind:
            raise ValueError(f"{self.prefix} holds {self.meta.get('kind')!r} data, not {self.kind}")
        self.seq_length = int(self.meta["seq_length"])
        self._ids = _Indexed(self.prefix)
        self._mask = _Indexed(mask_prefix(self.prefix))
        if not np.array_equal(self._ids.lengths, self._mask.lengths) or not np.array_equal(
            self._ids.doc_idx, self._mask.doc_idx
        ):
            raise ValueError(f"{self.prefix}: the mask dataset does not match the token dataset")

    def __len__(self) -> int:
        return int(self._ids.doc_idx.shape[0]) - 1

    @property
    def sample_lengths(self) -> np.ndarray:
        """Tokens per sample (for length-aware batching)."""
        c = np.concatenate([[0], np.cumsum(self._ids.lengths)])
        return c[self._ids.doc_idx[1:]] - c[self._ids.doc_idx[:-1]]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range (0..{len(self) - 1})")
        i %= len(self)
        a, b, lens = self._ids.span(i)
        ma, mb, _ = self._mask.span(i)
        tokens = np.asarray(self._ids.bin[a:b], np.int64)
        target = np.asarray(self._mask.bin[ma:mb], np.float32)
        cu = np.zeros(lens.shape[0] + 1, np.int32)
        np.cumsum(lens, out=cu[1:])
        last = cu[1:] - 1  # the last token of each sequence predicts nothing
        labels = np.empty_like(tokens)
        labels[:-1] = tokens[1:]
        loss_mask = np.zeros_like(target)
        loss_mask[:-1] = target[1:]
        labels[last] = IGNORE_INDEX
        loss_mask[last] = 0.0
        pos = np.arange(tokens.shape[0], dtype=np.int64) - np.repeat(cu[:-1], lens)
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": pos,
            "cu_seqlens": cu,
            "seq_lengths": lens.copy(),
        }

    @staticmethod
    def pad(sample: dict[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
        """``sample`` padded to ``length`` tokens: the padding is one more sequence (its own
        ``cu_seqlens`` entry, positions from 0, label -100, loss 0), so attention and labels of
        the real sequences are unchanged."""
        n = sample["tokens"].shape[0]
        if n > length:
            raise ValueError(f"sample of {n} tokens does not fit in {length}")
        if n == length:
            return dict(sample)
        k = length - n
        out = dict(sample)
        out["tokens"] = np.concatenate([sample["tokens"], np.full(k, pad_id, np.int64)])
        out["labels"] = np.concatenate([sample["labels"], np.full(k, IGNORE_INDEX, np.int64)])
        out["loss_mask"] = np.concatenate([sample["loss_mask"], np.zeros(k, np.float32)])
        out["position_ids"] = np.concatenate([sample["position_ids"], np.arange(k)])
        out["cu_seqlens"] = np.append(sample["cu_seqlens"], np.int32(length))
        out["seq_lengths"] = np.append(sample["seq_lengths"], k)
        if "chosen" in sample:
            out["chosen"] = np.append(sample["chosen"], False)
        return out


class SFTDataset(ChatDataset):
    """SFT samples (see :class:`ChatDataset`)."""

    kind = "sft"


class PreferenceDataset(ChatDataset):
    """Preference samples: the sequences of a sample alternate chosen, rejected (pair ``k`` is
    sequences ``2k`` and ``2k+1``; both always in the same sample). Adds ``chosen`` (bool, S):
    whether each sequence is a chosen answer."""

    kind = "preference"

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s = super().__getitem__(i)
        s["chosen"] = np.arange(s["seq_lengths"].shape[0]) % 2 == 0
        return s
