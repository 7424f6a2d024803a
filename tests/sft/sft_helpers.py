"""Helpers of the chat-data tests: an independent mask computed from character offsets."""

from __future__ import annotations

import re

import numpy as np

_ASSISTANT = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.S)


def reference_encoding(hf_tok, messages: list[dict], last_only: bool = False):
    """``(ids, mask)`` from the tokenizer alone: ids of ``apply_chat_template`` and the mask of
    the tokens overlapping the characters of each assistant answer and its ``<|im_end|>`` in the
    rendered string (found with a regular expression, not with sfmed's pieces)."""
    text = hf_tok.apply_chat_template(messages, tokenize=False)
    ids = list(hf_tok.apply_chat_template(messages)["input_ids"])
    enc = hf_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(enc["input_ids"]) == ids
    spans = [m.span(1) for m in _ASSISTANT.finditer(text)]
    if last_only:
        spans = spans[-1:]
    mask = np.zeros(len(ids), np.uint8)
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        mask[i] = any(a < e and b > s for s, e in spans)
    return ids, mask


def as_messages(turns) -> list[dict]:
    """sfmed turns as chat-template messages."""
    return [{"role": t.role, "content": t.content} for t in turns]
