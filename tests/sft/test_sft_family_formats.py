"""SFT/DPO encoding of the families' chat formats with SentencePiece tokenizers.

The expected ids are rebuilt here from the published reference code, with ``sentencepiece``
itself (not sfmed's encoder), and the expected loss masks from SentencePiece's own character
offsets:

* LLaMA-2-chat: Meta's ``Llama.chat_completion`` (meta-llama/llama ``llama/generation.py``):
  per exchange ``[bos] + sp.encode(f"[INST] {u.strip()} [/INST] {a.strip()} ") + [eos]``, a
  system turn folded into the first user turn as ``<<SYS>>\\n{s}\\n<</SYS>>\\n\\n{u}``.
* Chinese-Alpaca: ymcui/Chinese-LLaMA-Alpaca ``scripts/training/build_dataset.py``:
  ``tokenizer(source)`` (bos added) + ``tokenizer(f"{output}</s>", add_special_tokens=False)``,
  labels ``IGNORE`` over the source.
* Ziya: the Ziya-LLaMA-13B model card, ``'<human>:' + query.strip() + '\\n<bot>:'`` with bos;
  ChiMed-GPT's card the same with ``[human]``/``[bot]``.
* Baichuan-13B-Chat (DISC-MedLLM): ``_build_chat_input`` in its modeling_baichuan.py,
  ``[195] + encode(user)``, ``[196] + encode(answer) + [eos]``, ``[196]`` to prompt.

The real LLaMA-2 and Chinese-LLaMA SentencePiece models come from the shared folder (skipped
without it).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sfmed.core.errors import ConfigError
from sfmed.data.chat.encode import ChatEncoder
from sfmed.data.chat.formats import FORMATS, Turn, resolve_format
from sfmed.data.tokenizer import load_tokenizer

SYSTEM = "你是一名医生。 "
CONV = [
    Turn("user", " 头痛发热怎么办？ "),
    Turn("assistant", "多喝水，注意休息。"),
    Turn("user", "What is fever?"),
    Turn("assistant", "A body temperature above 37.5 °C."),
]


@pytest.fixture(scope="module")
def llama2_model(shared_dir):
    return shared_dir / "tokenizers" / "llama2-sentencepiece" / "tokenizer.model"


@pytest.fixture(scope="module")
def chinese_model(shared_dir):
    return shared_dir / "tokenizers" / "chinese-sp-sentencepiece" / "chinese_sp.model"


def _sp(path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def _span_mask(sp, text: str, start: int) -> list[int]:
    """1 for the tokens of ``sp.encode(text)`` that hold a character at or after ``start``
    (from sentencepiece's byte offsets)."""
    cut = len(text[:start].encode("utf-8"))
    return [int(p.end > cut) for p in sp.encode(text, return_type="proto").pieces]


def _encode(path, name, turns, mask="all", system=None):
    tok = load_tokenizer(path, with_hash=False)
    enc = ChatEncoder(
        tok, resolve_format(name, path, tok), mask=mask, system_prompt=system, tokenizer_path=path
    )
    turns = enc.prepare(turns)
    return turns, enc.encode([turns], [enc.train_flags(turns)])[0]


def _meta_llama2(sp, turns):
    """Meta's chat_completion, written out (plus the masks an SFT run trains)."""
    if turns[0].role == "system":
        sys_ = "<<SYS>>\n" + turns[0].content + "\n<</SYS>>\n\n"
        turns = [Turn("user", sys_ + turns[1].content), *turns[2:]]
    ids, mask = [], []
    for u, a in zip(turns[::2], turns[1::2], strict=True):
        head = f"[INST] {u.content.strip()} [/INST]"
        text = f"{head} {a.content.strip()} "
        ids += [sp.bos_id(), *sp.encode(text), sp.eos_id()]
        mask += [0, *_span_mask(sp, text, len(head)), 1]
    return ids, mask


def test_llama2_equals_meta_chat_completion(llama2_model):
    sp = _sp(llama2_model)
    for turns in (CONV, [Turn("system", SYSTEM), *CONV]):
        got_turns, e = _encode(llama2_model, "llama2", turns)
        want_ids, want_mask = _meta_llama2(sp, turns)
        assert e.ids.tolist() == want_ids
        assert e.mask.tolist() == want_mask
        # supervised: the answers (from the space before them) and both EOS, nothing else
        assert int(e.mask.sum()) == sum(want_mask) and e.ids[e.mask == 1].tolist().count(2) == 2
        # turn boundaries: each exchange ends with its EOS
        ends = e.turn_ends.tolist()
        assert [
            e.ids[x - 1] for x, t in zip(ends, got_turns, strict=True) if t.role == "assistant"
        ] == [2, 2]


def test_llama2_prompt_equals_meta_and_mask_last(llama2_model):
    from sfmed.data.chat.formats import make_format

    sp = _sp(llama2_model)
    fmt = make_format("llama2")
    turns = [Turn("system", SYSTEM), *CONV[:3]]
    pieces = fmt.prompt_pieces(turns)
    ids = []
    for p in pieces:
        ids += [sp.piece_to_id(p.text)] if p.special else sp.encode(p.text)
    want, _ = _meta_llama2(sp, turns[:3])
    want += [sp.bos_id(), *sp.encode(f"[INST] {CONV[2].content.strip()} [/INST]")]
    assert ids == want
    # mask=last trains only the final answer
    _, e = _encode(llama2_model, "llama2", CONV, mask="last")
    _, m = _meta_llama2(sp, CONV)
    first_eos = e.ids.tolist().index(2)
    assert (
        e.mask[: first_eos + 1].sum() == 0
        and e.mask[first_eos + 1 :].tolist() == m[first_eos + 1 :]
    )


def test_llama2_refuses_non_alternating_turns(llama2_model):
    from sfmed.data.chat.formats import make_format

    with pytest.raises(ConfigError, match="expected 'assistant'"):
        make_format("llama2").pieces([Turn("user", "a"), Turn("user", "b")], [False, False])


def test_chinese_alpaca_equals_build_dataset(chinese_model):
    sp = _sp(chinese_model)
    instruction, output = "头痛发热怎么办？", "多喝水，注意休息。"
    _, e = _encode(
        chinese_model, "chinese_alpaca", [Turn("user", instruction), Turn("assistant", output)]
    )
    source = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        f"completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: "
    )
    s = [sp.bos_id(), *sp.encode(source)]  # tokenizer(sources): bos added
    t = [*sp.encode(output), sp.eos_id()]  # tokenizer(f"{output}</s>", add_special_tokens=False)
    assert e.ids.tolist() == s + t
    assert e.mask.tolist() == [0] * len(s) + [1] * len(t)  # labels: IGNORE over the source


def test_chinese_alpaca_multi_turn_supervises_each_answer(chinese_model):
    sp = _sp(chinese_model)
    _, e = _encode(chinese_model, "chinese_alpaca", CONV)
    ids = e.ids.tolist()
    assert ids[0] == sp.bos_id() and ids.count(sp.bos_id()) == 1 and ids.count(sp.eos_id()) == 2
    answers = [sp.encode(t.content) + [sp.eos_id()] for t in CONV[1::2]]
    assert e.ids[e.mask == 1].tolist() == answers[0] + answers[1]


@pytest.mark.parametrize(
    "name,human,bot", [("ziya", "<human>", "<bot>"), ("chimed", "[human]", "[bot]")]
)
def test_ziya_and_chimed_follow_the_model_cards(chinese_model, name, human, bot):
    sp = _sp(chinese_model)
    turns = CONV[:2]
    _, e = _encode(chinese_model, name, turns)
    head = f"{human}:{turns[0].content.strip()}\n{bot}:"
    text = head + turns[1].content.strip()
    assert e.ids.tolist() == [sp.bos_id(), *sp.encode(text), sp.eos_id()]
    assert e.mask.tolist() == [0, *_span_mask(sp, text, len(head)), 1]
    # the generation prompt evaluation renders is the model card's, bos added by the tokenizer
    from sfmed.eval.chat_formats import CHAT_FORMATS

    chat = [{"role": "user", "content": turns[0].content}]
    fmt = CHAT_FORMATS[name]
    assert fmt.render(chat, None) == f"{human}:" + turns[0].content.strip() + f"\n{bot}:"
    assert fmt.add_special_tokens


def test_baichuan_equals_build_chat_input(llama2_model, tmp_path):
    """A Baichuan-shaped folder (SentencePiece ``tokenizer.model``, no tokenizer.json, a
    ``config.json`` of model_type baichuan): ``auto`` takes the family's format, ids 195/196
    are the role tokens whatever their strings are."""
    sp = _sp(llama2_model)
    d = tmp_path / "baichuan"
    d.mkdir()
    shutil.copy(llama2_model, d / "tokenizer.model")
    (d / "config.json").write_text(json.dumps({"model_type": "baichuan"}))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "BaichuanTokenizer", "auto_map": {"AutoTokenizer": ["x", None]}}
        )
    )
    _, e = _encode(d, "auto", CONV, system=SYSTEM)
    want, mask = list(sp.encode(SYSTEM)), [0] * len(sp.encode(SYSTEM))
    for t in CONV:
        c = sp.encode(t.content)
        if t.role == "user":
            want += [195, *c]
            mask += [0] * (1 + len(c))
        else:
            want += [196, *c, sp.eos_id()]
            mask += [0, *[1] * len(c), 1]
    assert e.ids.tolist() == want and e.mask.tolist() == mask
    tok = load_tokenizer(d, with_hash=False)
    fmt = resolve_format("auto", d, tok)
    assert fmt.name == "baichuan"
    # prompt: ..., then [196] (the assistant id)
    ps = fmt.prompt_pieces(CONV[:1])
    assert ps[-1].special and tok.token_id(ps[-1].text) == 196


def test_auto_uses_the_family_default_and_explains_a_missing_one(llama2_model, tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    shutil.copy(llama2_model, d / "tokenizer.model")
    with pytest.raises(ConfigError, match="no chat_template and no model config.json"):
        resolve_format("auto", d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_format("auto", d).name == "llama2"
    with pytest.raises(ConfigError, match="is not one of"):
        resolve_format("vicuna", d)


def test_a_missing_special_token_is_refused_before_work(tiny_tokenizer_dir):
    from sfmed.data.chat.formats import make_format

    # the tiny byte-level tokenizer has no <s>/</s>: llama2 cannot be encoded with it
    tok = load_tokenizer(tiny_tokenizer_dir, with_hash=False)
    with pytest.raises(ConfigError, match="needs '<s>' as one token"):
        ChatEncoder(tok, make_format("llama2"), tokenizer_path=tiny_tokenizer_dir)
    # ... and its ChatML chat_template is not LLaMA-2's: refused when the format is resolved
    with pytest.raises(ConfigError, match="renders differently"):
        resolve_format("llama2", tiny_tokenizer_dir, tok)


def test_every_format_masks_only_answers_and_end_tokens(chinese_model):
    """Whatever the format: decoding the supervised ids gives back the answers (and nothing of
    the prompts), and the last supervised id is the end-of-turn token."""
    sp = _sp(chinese_model)
    for name in ("chinese_alpaca", "ziya", "chimed", "llama2"):
        _, e = _encode(chinese_model, name, CONV)
        text = sp.decode(e.ids[e.mask == 1].tolist())
        for t in CONV:  # compare normalised texts (the model's NFKC maps "，" to ",")
            norm = sp.decode(sp.encode(t.content.strip()))
            assert (norm in text) == (t.role == "assistant"), (name, t)
        assert int(e.ids[np.flatnonzero(e.mask)[-1]]) == sp.eos_id()
    assert set(FORMATS) == {"chatml", "llama2", "chinese_alpaca", "ziya", "chimed", "baichuan"}
