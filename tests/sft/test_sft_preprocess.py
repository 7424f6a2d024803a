"""format=sft|preference end to end on small corpora: counts, on-disk layout, readers, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from sft_helpers import as_messages, reference_encoding

from sfmed.config.data import PreprocessConfig, SourceConfig
from sfmed.core.errors import ConfigError
from sfmed.data.chat.formats import Turn
from sfmed.data.chat.preprocess import BadChatRecordError
from sfmed.data.chat.store import IGNORE_INDEX, PreferenceDataset, SFTDataset
from sfmed.data.chat.turns import BadRecord, make_pairs, make_turns
from sfmed.data.preprocess import preprocess

REPO = Path(__file__).resolve().parents[2]


def _w(path: Path, rows, raw: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + list(raw)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _conv(*pairs):
    return {
        "conversation": [
            m
            for q, a in pairs
            for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
        ]
    }


GOOD = [
    _conv(("头痛两周了", "有没有发热？"), ("没有", "建议测血压。")),
    _conv(("糖尿病能吃西瓜吗", "少量可以，注意监测血糖。")),
    _conv(
        ("孩子咳嗽", "多喝水，观察体温。"), ("还流鼻涕", "可能是感冒。"), ("要吃药吗", "对症用药。")
    ),
]
BAD = {
    "unknown_role": {"conversation": [{"role": "nurse", "content": "x"}]},
    "empty_assistant": _conv(("问题", "")),
    "ends_on_user": {
        "conversation": [*_conv(("问", "答"))["conversation"], {"role": "user", "content": "还有"}]
    },
    "consecutive_turns": {
        "conversation": [{"role": "user", "content": "a"}, *_conv(("b", "c"))["conversation"]]
    },
    "malformed": {"other": 1},
}


def _cfg(tmp_path, tok, inp, **kw):
    chat = kw.pop("chat", {})
    return PreprocessConfig(
        tokenizer=str(tok),
        output_dir=str(tmp_path / "out"),
        input=str(inp),
        reader="jsonl",
        render=kw.pop("render", "dialogue"),
        name="src",
        chat=chat,
        **kw,
    )


def test_sft_counts_layout_and_reader(tmp_path, tiny_tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    inp = _w(tmp_path / "d.jsonl", GOOD * 4 + list(BAD.values()), raw=["{not json"])
    rep = preprocess(
        _cfg(tmp_path, tiny_tokenizer_dir, inp, format="sft", chat={"seq_length": 400})
    )
    st = rep["sources"]["src"]
    assert st["records"] == 12 + len(BAD) + 1
    assert st["kept"] == 12
    assert st["dropped"]["malformed"] == 2
    for reason in ("unknown_role", "empty_assistant", "ends_on_user", "consecutive_turns"):
        assert st["dropped"][reason] == 1, reason
    assert st["assistant_turns"] == 4 * (2 + 1 + 3)
    assert st["turns"] == 2 * st["assistant_turns"]
    md = (tmp_path / "out" / "sft_report.md").read_text()
    assert "| src | 18 | 12 |" in md and "unknown_role 1" in md
    assert json.loads((tmp_path / "out" / "sft_report.json").read_text())["total"]["kept"] == 12

    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    prefix = tmp_path / "out" / "src_sft"
    ds = SFTDataset(prefix)
    assert sum(ds.sample_lengths) == st["tokens"]
    assert all(n <= 400 for n in ds.sample_lengths)
    seen: list[list[int]] = []
    sup = 0
    for i in range(len(ds)):
        s = ds[i]
        cu, tokens = s["cu_seqlens"], s["tokens"]
        assert cu[0] == 0 and cu[-1] == len(tokens) <= 400
        for k in range(len(cu) - 1):
            a, b = int(cu[k]), int(cu[k + 1])
            seq = tokens[a:b].tolist()
            seen.append(seq)
            np.testing.assert_array_equal(s["position_ids"][a:b], np.arange(b - a))
            assert s["labels"][b - 1] == IGNORE_INDEX and s["loss_mask"][b - 1] == 0
            np.testing.assert_array_equal(s["labels"][a : b - 1], tokens[a + 1 : b])
        sup += int(s["loss_mask"].sum())
    assert sup == st["supervised_tokens"]
    # Every kept conversation is there once, exactly as apply_chat_template encodes it, with
    # the supervised targets of the offsets-based reference.
    want = []
    for r in GOOD * 4:
        turns = [Turn(m["role"], m["content"]) for m in r["conversation"]]
        sys_turn = [Turn("system", "You are a helpful assistant.")]
        want.append(reference_encoding(hf, as_messages(sys_turn + turns)))
    assert sorted(seen) == sorted(w[0] for w in want)
    # Megatron reads the same layout: sequences = conversations, documents = packs.
    m = IndexedDataset(str(prefix))
    assert len(m) == len(seen) and len(m.document_indices) == len(ds) + 1
    assert sorted(np.asarray(m[i]).tolist() for i in range(len(m))) == sorted(seen)
    mk = IndexedDataset(str(prefix) + "_mask")
    by_ids = {tuple(w[0]): w[1].tolist() for w in want}
    for i in range(len(m)):
        assert np.asarray(mk[i]).tolist() == by_ids[tuple(np.asarray(m[i]).tolist())]

    # strict=true makes the first bad record fatal, naming where it is.
    with pytest.raises(BadChatRecordError, match=r"d\.jsonl:13.*unknown_role"):
        preprocess(_cfg(tmp_path, tiny_tokenizer_dir, inp, format="sft", strict=True))


def test_sft_unpacked_overflow_and_mask_last(tmp_path, tiny_tokenizer_dir):
    long = _conv(("短问题", "短回答"), ("再问", "很长的回答" * 60))
    inp = _w(tmp_path / "d.jsonl", [long, *GOOD])
    base = {"seq_length": 200, "pack": False}
    rep = preprocess(_cfg(tmp_path, tiny_tokenizer_dir, inp, format="sft", chat=base))
    st = rep["sources"]["src"]
    assert st["truncated"] == 1 and st["kept"] == 4 and st["packing"]["packs"] == 4
    ds = SFTDataset(tmp_path / "out" / "src_sft")
    assert len(ds) == 4 and all(len(ds[i]["seq_lengths"]) == 1 for i in range(4))
    rep = preprocess(
        _cfg(tmp_path, tiny_tokenizer_dir, inp, format="sft", chat={**base, "overflow": "drop"})
    )
    assert rep["sources"]["src"]["dropped"]["too_long"] == 1
    assert rep["sources"]["src"]["kept"] == 3
    # mask=last: one supervised <|im_end|> per conversation.
    preprocess(_cfg(tmp_path, tiny_tokenizer_dir, inp, format="sft", chat={**base, "mask": "last"}))
    ds = SFTDataset(tmp_path / "out" / "src_sft")
    im_end = 599
    for i in range(len(ds)):
        s = ds[i]
        assert int(s["loss_mask"][s["labels"] == im_end].sum()) == 1
    # Padding is one more sequence: nothing of the real ones changes.
    s = ds[0]
    n = len(s["tokens"])
    p = SFTDataset.pad(s, 200, pad_id=0)
    assert len(p["tokens"]) == 200 and p["cu_seqlens"][-1] == 200
    assert p["cu_seqlens"][-2] == n and p["seq_lengths"][-1] == 200 - n
    assert p["loss_mask"][n:].sum() == 0 and (p["labels"][n:] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(p["position_ids"][n:], np.arange(200 - n))
    for k in ("tokens", "labels", "loss_mask", "position_ids"):
        np.testing.assert_array_equal(p[k][:n], s[k])
    with pytest.raises(ValueError, match="does not fit"):
        SFTDataset.pad(s, n - 1, pad_id=0)


def test_corpus_yaml_examples_give_conversations():
    shapes = {}
    for f in sorted((REPO / "conf/sources").glob("*.yaml")):
        d = yaml.safe_load(f.read_text())
        if d.get("render") not in ("dialogue", "history", "template") or not d.get("example"):
            continue
        src = SourceConfig(**d)
        turns = make_turns(src)(d["example"])
        roles = [t.role for t in turns]
        assert roles[-1] == "assistant" and "user" in roles, f.name
        assert all(t.content for t in turns), f.name
        shapes.setdefault(src.render, []).append(f.stem)
    assert {"dialogue", "history", "template"} <= set(shapes)
    # CMtMedQA: history + last turn, in order.
    d = yaml.safe_load((REPO / "conf/sources/cmtmedqa.yaml").read_text())
    turns = make_turns(SourceConfig(**d))(d["example"])
    assert [t.content for t in turns] == [
        *d["example"]["history"][0],
        d["example"]["instruction"],
        d["example"]["output"],
    ]


def test_turn_shapes():
    sharegpt = SourceConfig(render="dialogue")
    t = make_turns(sharegpt)(
        {"conversations": [{"from": "human", "value": " 问 "}, {"from": "gpt", "value": "答"}]}
    )
    assert t == [Turn("user", "问"), Turn("assistant", "答")]
    t = make_turns(sharegpt)(
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]}
    )
    assert t[0] == Turn("system", "S")
    with pytest.raises(BadRecord, match="turns.roles.nurse") as e:
        make_turns(sharegpt)({"messages": [{"role": "nurse", "content": "x"}]})
    assert e.value.reason == "unknown_role"
    mapped = SourceConfig(render="dialogue", turns={"roles": {"nurse": "assistant", "note": None}})
    mapped._validate_reader("")
    t = make_turns(mapped)(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "note", "content": "n"},
                {"role": "nurse", "content": "a"},
            ]
        }
    )
    assert [x.role for x in t] == ["user", "assistant"]
    # huatuo26M one-element lists, instruction/input/output, per-sample system prompt.
    hu = SourceConfig(
        render="template",
        template=["问：{instruction}", "{input}", "答：{output}"],
        turns={"system": "sys"},
    )
    hu._validate_reader("")
    t = make_turns(hu)({"instruction": ["头痛"], "input": "", "output": ["休息"], "sys": "医生"})
    assert t == [Turn("system", "医生"), Turn("user", "头痛"), Turn("assistant", "休息")]
    t = make_turns(hu)({"instruction": "a", "input": "b", "output": "c"})
    assert t[0] == Turn("user", "a\nb")
    chatmed = SourceConfig(render="template", template="问：{query}\n答：{response}")
    assert make_turns(chatmed)({"query": "q", "response": "r"}) == [
        Turn("user", "q"),
        Turn("assistant", "r"),
    ]
    with pytest.raises(BadRecord, match="missing field 'response'"):
        make_turns(chatmed)({"query": "q"})
    with pytest.raises(ConfigError, match="no conversation turns"):
        make_turns(SourceConfig(render="field"))
    with pytest.raises(ConfigError, match="turns.roles.x"):
        SourceConfig(render="dialogue", turns={"roles": {"x": "doctor"}})._validate_reader("")


def test_pair_shapes():
    ex = make_pairs(SourceConfig(render="dialogue"))
    p, c, r = ex({"question": "q", "response_chosen": "c", "response_rejected": "r"})
    assert (p, c, r) == ([Turn("user", "q")], "c", "r")
    p, c, r = ex(
        {"conversations": [{"from": "human", "value": "q"}], "chosen": "c", "rejected": "r"}
    )
    assert p == [Turn("user", "q")]
    p, c, r = ex(
        {
            "prompt": [
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"},
            ],
            "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "r"}],
        }
    )
    assert [t.role for t in p] == ["user", "assistant", "user"] and (c, r) == ("c", "r")
    assert ex({"prompt": "q", "chosen": "c", "rejected": "r"})[0] == [Turn("user", "q")]
    with pytest.raises(BadRecord, match="chosen"):
        ex({"prompt": "q", "rejected": "r"})


def test_preference_pairs_end_to_end(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    rows = [
        {
            "question": "头痛怎么办",
            "response_chosen": "建议就医检查。",
            "response_rejected": "忍一忍。",
        },
        {
            "conversations": [{"from": "human", "value": "发烧了"}],
            "chosen": "多喝水，测体温。",
            "rejected": "不用管。",
        },
        {"prompt": "咳嗽", "chosen": "观察", "rejected": "观察"},  # identical
        {"prompt": "咳嗽", "chosen": "", "rejected": "x"},  # empty side
        {"prompt": "很长的问题" * 80, "chosen": "a", "rejected": "b"},  # prompt too long
        {"prompt": "问", "chosen": "同样的开头" * 40 + "甲", "rejected": "同样的开头" * 40 + "乙"},
    ]
    inp = _w(tmp_path / "p.jsonl", rows)
    rep = preprocess(
        _cfg(tmp_path, tiny_tokenizer_dir, inp, format="preference", chat={"seq_length": 300})
    )
    st = rep["sources"]["src"]
    assert st["records"] == 6 and st["kept"] == 2
    d = st["dropped"]
    assert d["identical"] == 1 and d["empty_side"] == 1 and d["prompt_too_long"] == 1
    assert d["same_after_truncation"] == 1
    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ds = PreferenceDataset(tmp_path / "out" / "src_preference")
    pairs = []
    for i in range(len(ds)):
        s = ds[i]
        assert len(s["seq_lengths"]) % 2 == 0  # pairs never split across samples
        cu = s["cu_seqlens"]
        for k in range(0, len(cu) - 1, 2):
            assert s["chosen"][k] and not s["chosen"][k + 1]
            pairs.append([s["tokens"][cu[j] : cu[j + 1]].tolist() for j in (k, k + 1)])
            # Shared prompt; each side supervised only on its own answer (+ <|im_end|>).
            for j in (k, k + 1):
                lm = s["loss_mask"][cu[j] : cu[j + 1]]
                assert (
                    int(lm.sum()) > 0
                    and int((s["labels"][cu[j] : cu[j + 1]][lm > 0] == 599).sum()) == 1
                )
    sys_ = {"role": "system", "content": "You are a helpful assistant."}
    want = []
    for q, c, r in (
        ("头痛怎么办", "建议就医检查。", "忍一忍。"),
        ("发烧了", "多喝水，测体温。", "不用管。"),
    ):
        msgs = [sys_, {"role": "user", "content": q}]
        want.append(
            [
                reference_encoding(hf, [*msgs, {"role": "assistant", "content": a}], True)[0]
                for a in (c, r)
            ]
        )
    assert sorted(pairs) == sorted(want)
    padded = PreferenceDataset.pad(ds[0], 300, pad_id=0)
    assert len(padded["chosen"]) == len(padded["seq_lengths"]) and not padded["chosen"][-1]
    with pytest.raises(BadChatRecordError, match="identical"):
        preprocess(_cfg(tmp_path, tiny_tokenizer_dir, inp, format="preference", strict=True))


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="format="):
        PreprocessConfig(tokenizer="t", output_dir="o", input="x", format="dpo")
    with pytest.raises(ConfigError, match="chat.mask"):
        PreprocessConfig(tokenizer="t", output_dir="o", input="x", chat={"mask": "first"})
    with pytest.raises(ConfigError, match="chat.seq_length"):
        PreprocessConfig(tokenizer="t", output_dir="o", input="x", chat={"seq_length": 0})


def test_cli(tmp_path, tiny_tokenizer_dir):
    inp = _w(tmp_path / "d.jsonl", GOOD)
    cmd = [
        sys.executable,
        str(REPO / "launch/preprocess.py"),
        "format=sft",
        f"input={inp}",
        "render=dialogue",
        f"tokenizer={tiny_tokenizer_dir}",
        f"output_dir={tmp_path / 'o'}",
        "chat.seq_length=256",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "# sft data" in p.stdout and "| d | 3 | 3 |" in p.stdout
    p = subprocess.run([*cmd, "chat.mask=first"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and "chat.mask='first'" in p.stderr


def test_verify_tokenizer(tmp_path, tiny_tokenizer_dir, monkeypatch):
    import sfmed.data.chat.preprocess as chat_pre

    inp = _w(tmp_path / "d.jsonl", GOOD)
    rep = preprocess(_cfg(tmp_path, tiny_tokenizer_dir, inp, format="sft", verify_tokenizer=10))
    assert rep["sources"]["src"]["kept"] == 3
    pairs = _w(tmp_path / "p.jsonl", [{"prompt": "问", "chosen": "好", "rejected": "坏"}])
    cfg = _cfg(tmp_path, tiny_tokenizer_dir, pairs, format="preference", verify_tokenizer=10)
    assert preprocess(cfg)["sources"]["src"]["kept"] == 1
    # A reference that disagrees is caught (the check compares, it does not trust the encoder).
    monkeypatch.setattr(chat_pre, "reference_encoder", lambda path: lambda text: [0])
    with pytest.raises(chat_pre.ChatEncodingMismatch, match=r"d\.jsonl:1"):
        cfg = _cfg(tmp_path, tiny_tokenizer_dir, inp, format="sft", verify_tokenizer=1, force=True)
        preprocess(cfg)


def test_rerun_reuses_complete_outputs(tmp_path, tiny_tokenizer_dir):
    inp = _w(tmp_path / "d.jsonl", GOOD)
    first = preprocess(_cfg(tmp_path, tiny_tokenizer_dir, inp, format="sft"))["sources"]["src"]
    assert first["reused"] is False
    bin_file = tmp_path / "out" / "src_sft.bin"
    mtime = bin_file.stat().st_mtime_ns
    again = preprocess(_cfg(tmp_path, tiny_tokenizer_dir, inp, format="sft"))["sources"]["src"]
    assert again["reused"] is True and again["tokens"] == first["tokens"]
    assert bin_file.stat().st_mtime_ns == mtime
    # A changed setting, a truncated file or force=true redo the source.
    changed = _cfg(tmp_path, tiny_tokenizer_dir, inp, format="sft", chat={"mask": "last"})
    st = preprocess(changed)["sources"]["src"]
    assert st["reused"] is False and st["supervised_tokens"] < first["supervised_tokens"]
    mask_bin = tmp_path / "out" / "src_sft_mask.bin"
    mask_bin.write_bytes(mask_bin.read_bytes()[:-1])
    assert preprocess(changed)["sources"]["src"]["reused"] is False
    assert preprocess(changed)["sources"]["src"]["reused"] is True
    forced = _cfg(
        tmp_path, tiny_tokenizer_dir, inp, format="sft", chat={"mask": "last"}, force=True
    )
    assert preprocess(forced)["sources"]["src"]["reused"] is False


def test_a_source_that_keeps_nothing_is_refused(tmp_path, tiny_tokenizer_dir):
    """Every pair's prompt longer than seq_length (or every conversation broken): refused with
    the drop counts and what to change, and no dataset left that a trainer would pick up."""
    from sfmed.core.errors import UserError

    long = [{"prompt": "很长的问题" * 80, "chosen": "a", "rejected": "b"}] * 3
    inp = _w(tmp_path / "p.jsonl", long)
    ok = _w(
        tmp_path / "ok.jsonl", [{"prompt": "问", "chosen": "建议就医。", "rejected": "不用管。"}]
    )
    # The same folder held a complete dataset of this name from an earlier run.
    preprocess(
        _cfg(tmp_path, tiny_tokenizer_dir, ok, format="preference", chat={"seq_length": 300})
    )
    old = tmp_path / "out" / "src_preference"
    assert PreferenceDataset(old) is not None
    with pytest.raises(UserError) as e:
        preprocess(
            _cfg(tmp_path, tiny_tokenizer_dir, inp, format="preference", chat={"seq_length": 300})
        )
    msg = str(e.value)
    assert "all 3 records were dropped" in msg and "'prompt_too_long': 3" in msg
    assert "raise chat.seq_length" in msg
    assert not list((tmp_path / "out").glob("src_preference*"))

    broken = _w(tmp_path / "s.jsonl", [BAD["empty_assistant"], BAD["malformed"]])
    with pytest.raises(UserError, match="all 2 records were dropped, no conversations kept"):
        preprocess(_cfg(tmp_path, tiny_tokenizer_dir, broken, format="sft"))
