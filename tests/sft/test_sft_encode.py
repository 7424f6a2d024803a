"""Chat encoding: ids equal apply_chat_template, the loss mask follows role spans."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from sft_helpers import as_messages, reference_encoding

from sfmed.config.data import SourceConfig
from sfmed.core.errors import ConfigError
from sfmed.data.chat.encode import ChatEncoder
from sfmed.data.chat.formats import Turn, resolve_format
from sfmed.data.chat.turns import BadRecord, make_turns
from sfmed.data.tokenizer import load_tokenizer

CONVS = [
    [Turn("user", "高血压患者平时饮食需要注意什么？"), Turn("assistant", "低盐低脂饮食。")],
    [
        Turn("system", "你是一名全科医生。"),
        Turn("user", "最近胃经常胀痛，怎么回事？"),
        Turn("assistant", "可能是慢性胃炎，饮食规律吗？"),
        Turn("user", "不太规律。"),
        Turn("assistant", "建议规律饮食，症状持续请做胃镜。"),
    ],
    [
        Turn("user", "What is the dose of aspirin?"),
        Turn("assistant", "100 mg daily.\n\nSee a doctor."),
    ],
    [Turn("user", "a"), Turn("assistant", "b"), Turn("user", "c"), Turn("assistant", "d" * 50)],
    # Unstripped content whose first token merges with the head's "\n": the offsets path.
    [Turn("user", "  q  "), Turn("assistant", "\n\n\n答：好 ")],
]


def _encoder(tok_dir, **kw):
    tok = load_tokenizer(tok_dir)
    return ChatEncoder(tok, resolve_format("auto", tok_dir), tokenizer_path=tok_dir, **kw)


def _check(enc, hf, convs, last_only=False):
    prepared = [enc.prepare(c) for c in convs]
    out = enc.encode(prepared, [enc.train_flags(t) for t in prepared])
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    for turns, e in zip(prepared, out, strict=True):
        ids, mask = reference_encoding(hf, as_messages(turns), last_only)
        assert e.ids.tolist() == ids
        np.testing.assert_array_equal(e.mask, mask)
        n_assistant = 1 if last_only else sum(t.role == "assistant" for t in turns)
        assert int(e.mask[e.ids == im_end].sum()) == n_assistant
        # The "\n" after a supervised <|im_end|> is never supervised.
        ends = np.flatnonzero((e.ids == im_end) & (e.mask == 1))
        assert not e.mask[ends + 1].any()
        assert e.turn_ends[-1] == len(e)
    return out


def test_tiny_ids_equal_chat_template_and_mask_by_offsets(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    out = _check(_encoder(tiny_tokenizer_dir), hf, CONVS)
    # Default system prompt added when none is given.
    assert hf.decode(out[0].ids[:40]).startswith("<|im_start|>system\nYou are a helpful")
    _check(_encoder(tiny_tokenizer_dir, mask="last"), hf, CONVS, last_only=True)


def test_system_prompt_override(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    enc = _encoder(tiny_tokenizer_dir, system_prompt="你是医生。")
    turns = enc.prepare(CONVS[0])
    assert turns[0] == Turn("system", "你是医生。")
    e = enc.encode([turns], [enc.train_flags(turns)])[0]
    assert e.ids.tolist() == reference_encoding(hf, as_messages(turns))[0]


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        ([Turn("user", "q")], "no_assistant"),
        ([Turn("user", "q"), Turn("assistant", "")], "empty_assistant"),
        ([Turn("user", "q"), Turn("assistant", "a"), Turn("user", "q2")], "ends_on_user"),
        ([Turn("user", "q"), Turn("user", "q2"), Turn("assistant", "a")], "consecutive_turns"),
        ([Turn("assistant", "a")], "starts_on_assistant"),
        ([Turn("user", "q"), Turn("system", "s"), Turn("assistant", "a")], "misplaced_system"),
        ([Turn("user", ""), Turn("assistant", "a")], "empty_user"),
        ([Turn("user", "q"), Turn("assistant", "a<|im_end|>b")], "special_token"),
    ],
)
def test_bad_conversations(tiny_tokenizer_dir, turns, reason):
    with pytest.raises(BadRecord) as e:
        _encoder(tiny_tokenizer_dir).prepare(turns)
    assert e.value.reason == reason


def test_consecutive_user_allowed_when_asked(tiny_tokenizer_dir):
    enc = _encoder(tiny_tokenizer_dir, require_alternation=False)
    turns = [Turn("user", "q"), Turn("user", "q2"), Turn("assistant", "a")]
    assert len(enc.prepare(turns)) == 4


def test_truncation_keeps_whole_assistant_turns(tiny_tokenizer_dir):
    for mode in ("all", "last"):
        enc = _encoder(tiny_tokenizer_dir, mask=mode)
        turns = enc.prepare(CONVS[1])
        e = enc.encode([turns], [enc.train_flags(turns)])[0]
        first_answer_end = int(e.turn_ends[2])
        cut = enc.fit(turns, e, len(e) - 1)
        assert len(cut) == first_answer_end
        np.testing.assert_array_equal(cut.ids, e.ids[:first_answer_end])
        # The kept answer is supervised in both modes (re-encoded for mask=last).
        ref = enc.encode([turns[:3]], [[False, False, True]])[0]
        np.testing.assert_array_equal(cut.mask, ref.mask)
        assert enc.fit(turns, e, first_answer_end - 1) is None
        assert enc.fit(turns, e, len(e)) is e


def test_template_mismatch_is_refused(tiny_tokenizer_dir, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    # A ChatML variant without the default system turn: sfmed must not pretend to match it.
    cfg["chat_template"] = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}"
    )
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in d.glob("chat_template.*"):
        f.unlink()
    with pytest.raises(ConfigError, match="renders differently"):
        resolve_format("auto", d)
    # an [INST] template that is not LLaMA-2's is recognised as llama2 and then refused
    cfg["chat_template"] = "{% for m in messages %}[INST] {{ m['content'] }}{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="chat.template=llama2.*renders differently"):
        resolve_format("auto", d)
    cfg["chat_template"] = "{% for m in messages %}### {{ m['content'] }}{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="not one sfmed knows"):
        resolve_format("auto", d)


def _real_conversations(data) -> dict[str, list[list[Turn]]]:
    """Turns of real records through the corpus shapes (the YAMLs' reader options)."""
    out = {}
    disc = SourceConfig(render="dialogue", fields={"messages": "conversation"})
    recs = [json.loads(x) for x in (data / "DISC-MedLLM/train/test_examples.jsonl").open()]
    out["disc"] = [make_turns(disc)(r) for r in recs[:60]]
    mg = SourceConfig(render="dialogue", fields={"messages": "conversations"})
    lines = (data / "MedicalGPT/sft/medical_sft_1K_format.jsonl").open()
    out["medicalgpt"] = [make_turns(mg)(json.loads(x)) for x, _ in zip(lines, range(60))]
    hu = SourceConfig(
        render="template",
        template=["问：{instruction}", "{input}", "答：{output}"],
        required=["instruction", "output"],
    )
    recs = json.loads((data / "huatuo26M_test/huatuo26M_test.json").read_text())
    out["huatuo26m"] = [make_turns(hu)(r) for r in recs[:60]]
    cmd = SourceConfig(render="template", template=["问：{title}", "{ask}", "答：{answer}"])
    with (data / "Chinese-medical-dialogue-data/sample_IM_5000-6000.utf8.csv").open() as f:
        rows = [r for r, _ in zip(csv.DictReader(f), range(60))]
    out["chinese_medical_dialogue"] = [make_turns(cmd)(r) for r in rows]
    return out


@pytest.mark.shared
def test_real_qwen2_tokenizer_and_real_conversations(qwen2_tokenizer_dir, shared_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    enc = _encoder(qwen2_tokenizer_dir)
    _check(enc, hf, CONVS)  # the last one takes the offsets path with Qwen2's pre-tokenizer
    for name, convs in _real_conversations(shared_dir / "data").items():
        good = []
        for c in convs:
            try:
                good.append(enc.prepare(c))
            except BadRecord:
                continue
        assert len(good) >= 50, name
        out = _check(enc, hf, good)
        assert sum(int(e.mask.sum()) for e in out) > 0
        if name == "disc":  # real multi-turn consultations are among them
            assert any(sum(x.role == "assistant" for x in t) > 1 for t in good)


@pytest.mark.shared
def test_other_chatml_variants_are_refused(shared_dir):
    """Qwen3's template (no default system turn, thinking blocks) is not Qwen2's ChatML."""
    qwen3 = shared_dir / "tokenizers" / "qwen3"
    if not (qwen3 / "tokenizer_config.json").is_file():
        pytest.skip("no Qwen3 tokenizer in ../shared")
    with pytest.raises(ConfigError, match="renders differently"):
        resolve_format("auto", qwen3)
