"""The whole pipeline on self-made corpora: counts, ids vs HF tokenizers, dedup across sources,
strict mode, workers, resume after an interrupted run, and megatron-core reading the outputs."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import check_accounting, expected_texts, hf_ids, qa_rows, read_docs, write_jsonl

from sfmed.config.data import PreprocessConfig, SourceConfig
from sfmed.data import preprocess as pp
from sfmed.data.io import InputError

QA_TPL = "问：{question}\n答：{answer}"
SHARED_PAIR = {"question": "同一个问题出现在两个语料里？", "answer": "是的，只保留一次。"}
LONG = (
    "慢性胃炎是胃黏膜的慢性炎症，常见病因包括幽门螺杆菌感染、长期服用非甾体抗炎药和胆汁反流。" * 3
)


def make_corpora(root: Path) -> dict[str, SourceConfig]:
    """Five sources in different shapes with known problems (see the counts asserted below)."""
    rows = qa_rows(30) + [SHARED_PAIR, qa_rows(1)[0]]  # last: duplicate within the source
    rows += [{"question": "<p>药品说明书</p>", "answer": "<br/>口服，一次1片&nbsp;，一日3次。"}]
    rows += [{"question": "短", "answer": "好"}, {"question": "只有问题"}]  # too short, malformed
    rows += [
        {"question": "近似重复" + LONG, "answer": "A"},
        {"question": "近似重复" + LONG + "。", "answer": "A"},
    ]
    write_jsonl(root / "qa/part-0.jsonl", rows, raw_lines={5: b'{"question": "broken', 9: b""})

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("department", "question", "answer"))
    w.writerows(
        (f"科{i}", q["question"], q["answer"]) for i, q in enumerate(qa_rows(8, offset=100))
    )
    w.writerow(("内科", SHARED_PAIR["question"], SHARED_PAIR["answer"]))
    data = buf.getvalue().encode("gb18030")
    data += "外科,坏字节".encode("gb18030") + b"\xff\xff" + ",回答很长很长很长\n".encode("gb18030")
    (root / "dialog").mkdir()
    (root / "dialog/d.csv").write_bytes(data)

    book = "\n\n".join(f"第{i}章 内容：" + LONG[: 40 + i] for i in range(12)) + "\n"
    (root / "book").mkdir()
    (root / "book/b.txt.gz").write_bytes(gzip.compress(book.encode()))

    exam = [
        {
            "question": f"第{i}题：心梗最常见的症状是？",
            "option": {"A": "胸痛", "B": "头痛"},
            "answer": "A",
        }
        for i in range(6)
    ]
    exam.append({"question": "缺答案的题", "option": ["x", "y"]})
    (root / "exam").mkdir()
    (root / "exam/e.json").write_text(json.dumps(exam, ensure_ascii=False), encoding="utf-8")

    chats = [
        {
            "conversations": [
                {"from": "human", "value": f"问题{i}：头痛怎么办？"},
                {"from": "gpt", "value": f"回答{i}：注意休息，必要时就医。"},
            ]
        }
        for i in range(5)
    ]
    chats.append({"conversations": [{"from": "alien", "value": "?"}]})
    write_jsonl(root / "chat/c.jsonl", chats)

    return {
        "qa": SourceConfig(
            files=["qa/*.jsonl"],
            reader="jsonl",
            render="template",
            template=QA_TPL,
            group="medical",
        ),
        "dialog": SourceConfig(
            files=["dialog/d.csv"],
            reader="csv",
            encoding="gb18030",
            render="template",
            template=QA_TPL,
            group="medical",
        ),
        "book": SourceConfig(
            files=["book/*.txt.gz"], reader="text", text_mode="paragraph", group="general"
        ),
        "exam": SourceConfig(
            files=["exam/e.json"],
            reader="json",
            render="mcq",
            fields={"options": "option"},
            group="medical",
        ),
        "chat": SourceConfig(
            files=["chat/c.jsonl"], reader="jsonl", render="dialogue", group="medical"
        ),
    }


@pytest.fixture
def corpora(tmp_path):
    root = tmp_path / "raw"
    return root, make_corpora(root)


def _cfg(root, sources, tok, out, **kw) -> PreprocessConfig:
    return PreprocessConfig(
        tokenizer=str(tok), output_dir=str(out), data_root=str(root), sources=dict(sources), **kw
    )


def test_pipeline_counts_ids_and_cross_source_dedup(corpora, tiny_tokenizer_dir, tmp_path):
    root, sources = corpora
    cfg = _cfg(root, sources, tiny_tokenizer_dir, tmp_path / "out")
    report = pp.preprocess(cfg)
    check_accounting(report)
    s = report["sources"]
    assert s["qa"]["records_read"] == 38  # 37 JSON records + the broken line (blank line skipped)
    assert s["qa"]["dropped"] == {
        **dict.fromkeys(s["qa"]["dropped"], 0),
        "malformed": 2,
        "duplicate": 1,
        "too_short": 1,
    }
    assert any(":6: invalid JSON" in x for x in s["qa"]["malformed_samples"])  # file:line
    assert s["dialog"]["dropped"]["duplicate"] == 1  # the QA pair already kept from "qa"
    assert s["dialog"]["dropped"]["decode_error"] == 1 and s["dialog"]["invalid_bytes"] == 2
    assert s["book"]["records_read"] == 12 and s["book"]["records_kept"] == 12
    assert s["exam"]["dropped"]["malformed"] == 1 and s["chat"]["dropped"]["malformed"] == 1
    assert set(report["groups"]) == {"medical", "general"}
    assert report["groups"]["general"]["sources"] == ["book"]

    expected = expected_texts(root, sources, cfg)
    eod = report["settings"]["tokenizer"]["eod_id"]
    for name in sources:
        prefix = tmp_path / "out" / f"{name}_text_document"
        docs = read_docs(prefix)
        assert docs == hf_ids(tiny_tokenizer_dir, expected[name], eod), name
        assert s[name]["tokens"] == sum(map(len, docs))
        meta = json.loads(Path(f"{prefix}.json").read_text())
        assert meta["tokenizer"]["hash"] == report["settings"]["tokenizer"]["hash"]
        assert meta["documents"] == len(docs)
    md = (tmp_path / "out/report.md").read_text()
    assert "数据集Token数" in md and "**medical total**" in md and "**total**" in md


@pytest.mark.parametrize(("clean", "dedup"), [(False, "none"), (True, "near")])
def test_modes_keep_ids_identical_to_hf(corpora, tiny_tokenizer_dir, tmp_path, clean, dedup):
    root, sources = corpora
    sources = {k: sources[k] for k in ("qa", "book")}
    cfg = _cfg(root, sources, tiny_tokenizer_dir, tmp_path / "out", clean=clean, dedup=dedup)
    report = pp.preprocess(cfg)
    check_accounting(report)
    qa = report["sources"]["qa"]
    if dedup == "near":
        assert qa["dropped"]["near_duplicate"] >= 1  # "近似重复…" vs the same text + "。"
        expected = expected_texts(root, sources, cfg)["qa"]
        docs = read_docs(tmp_path / "out/qa_text_document")
        eod = report["settings"]["tokenizer"]["eod_id"]
        ref = hf_ids(tiny_tokenizer_dir, expected, eod)
        assert (
            all(d in ref for d in docs) and len(docs) == len(ref) - qa["dropped"]["near_duplicate"]
        )
    else:
        assert qa["dropped"]["duplicate"] == 0 and qa["dropped"]["too_short"] == 0
        expected = expected_texts(root, sources, cfg)
        for name in sources:
            eod = report["settings"]["tokenizer"]["eod_id"]
            assert read_docs(tmp_path / f"out/{name}_text_document") == hf_ids(
                tiny_tokenizer_dir, expected[name], eod
            )
        # clean=false writes the parsed text exactly: the HTML record keeps its tags.
        assert any("<p>药品说明书</p>" in t for t in expected["qa"])


def test_workers_and_chunking_do_not_change_the_output(corpora, tiny_tokenizer_dir, tmp_path):
    root, sources = corpora
    big = qa_rows(3000, offset=1000)
    write_jsonl(root / "qa/part-1.jsonl", big)
    a = pp.preprocess(_cfg(root, sources, tiny_tokenizer_dir, tmp_path / "a", workers=1))
    b = pp.preprocess(
        _cfg(root, sources, tiny_tokenizer_dir, tmp_path / "b", workers=2, chunk_mb=0.02)
    )
    assert b["settings"]["workers"] == 2
    for name in sources:
        for ext in (".bin", ".idx"):
            pa_, pb = (tmp_path / d / f"{name}_text_document{ext}" for d in ("a", "b"))
            assert pa_.read_bytes() == pb.read_bytes(), (name, ext)
        assert a["sources"][name]["dropped"] == b["sources"][name]["dropped"]
        assert a["sources"][name]["malformed_samples"] == b["sources"][name]["malformed_samples"]


def test_strict_makes_malformed_input_fatal(corpora, tiny_tokenizer_dir, tmp_path):
    root, sources = corpora
    with pytest.raises(pp.MalformedInputError, match=r"part-0\.jsonl:6: invalid JSON"):
        pp.preprocess(
            _cfg(root, {"qa": sources["qa"]}, tiny_tokenizer_dir, tmp_path / "o", strict=True)
        )
    assert not list((tmp_path / "o").glob("*.bin"))
    with pytest.raises(pp.MalformedInputError, match=r"d\.csv:11: 2 byte\(s\) invalid in gb18030"):
        pp.preprocess(
            _cfg(
                root, {"dialog": sources["dialog"]}, tiny_tokenizer_dir, tmp_path / "o", strict=True
            )
        )


def _snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    return {
        p.name: (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(out.glob("*_text_document.*"))
    }


def test_resume_after_interrupt_and_after_changes(
    corpora, tiny_tokenizer_dir, tmp_path, monkeypatch
):
    root, sources = corpora
    out = tmp_path / "out"
    fresh = tmp_path / "fresh"
    pp.preprocess(_cfg(root, sources, tiny_tokenizer_dir, fresh))

    real = pp._consume

    def interrupted(acc, r, exact, near):
        if acc.s.name == "book":  # Ctrl-C while the third source is being written
            raise KeyboardInterrupt
        return real(acc, r, exact, near)

    monkeypatch.setattr(pp, "_consume", interrupted)
    with pytest.raises(KeyboardInterrupt):  # small chunks: the task feeder is blocked when it hits
        pp.preprocess(_cfg(root, sources, tiny_tokenizer_dir, out, chunk_mb=0.0002))
    monkeypatch.setattr(pp, "_consume", real)
    names = {p.name for p in out.iterdir()}
    assert {"qa_text_document.json", "dialog_text_document.json"} <= names
    assert not any(n.startswith(("book_", "exam_", "chat_")) for n in names), names
    assert not any("tmp" in n for n in names), names  # no temporary files left behind
    assert "report.json" not in names

    report = pp.preprocess(_cfg(root, sources, tiny_tokenizer_dir, out))
    assert [s["reused"] for s in report["sources"].values()] == [True, True, False, False, False]
    assert {k: v[1] for k, v in _snapshot(out).items() if not k.endswith(".json")} == {
        k: v[1] for k, v in _snapshot(fresh).items() if not k.endswith(".json")
    }
    check_accounting(report)
    assert report["sources"]["qa"]["dropped"]["duplicate"] == 1  # stats of reused outputs kept

    before = _snapshot(out)
    report = pp.preprocess(_cfg(root, sources, tiny_tokenizer_dir, out))
    assert all(s["reused"] for s in report["sources"].values()) and _snapshot(out) == before

    # Changing one input redoes it and (dedup is across sources) the sources after it.
    csv = root / "dialog/d.csv"
    csv.write_bytes(csv.read_bytes() + "内科,新增的问题是什么？,新增的回答。\n".encode("gb18030"))
    report = pp.preprocess(_cfg(root, sources, tiny_tokenizer_dir, out))
    assert [s["reused"] for s in report["sources"].values()] == [True, False, False, False, False]
    assert (
        report["sources"]["dialog"]["records_kept"]
        == report["sources"]["dialog"]["records_read"] - 2
    )
    # A damaged output is detected and redone.
    (out / "exam_text_document.bin").write_bytes(b"\0" * 8)
    report = pp.preprocess(_cfg(root, sources, tiny_tokenizer_dir, out))
    assert not report["sources"]["exam"]["reused"] and report["sources"]["chat"]["reused"]


def test_gpt_dataset_reads_a_blend_of_the_outputs(corpora, tiny_tokenizer_dir, tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from sfmed.data.blend import resolve_blend

    root, sources = corpora
    report = pp.preprocess(_cfg(root, sources, tiny_tokenizer_dir, tmp_path / "out"))
    eod = report["settings"]["tokenizer"]["eod_id"]
    entries = [
        {"prefix": str(tmp_path / f"out/{n}_text_document"), "tokens": 5000} for n in ("qa", "book")
    ]
    prefixes, weights = resolve_blend(entries, tokenizer=tiny_tokenizer_dir)
    assert weights == [0.5, 0.5]

    class Tok:  # what GPTDatasetConfig reads of a tokenizer when samples are ids already
        vocab_size, unique_identifiers = 600, {"class": "test"}

    Tok.eod = eod

    cfg = GPTDatasetConfig(
        random_seed=1,
        sequence_length=32,
        blend=(prefixes, weights),
        split="100,0,0",
        path_to_cache=None,
        tokenizer=Tok(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [40, 0, 0], lambda: True, cfg).build()
    assert len(train) >= 40
    all_ids = set(np.concatenate([np.concatenate(read_docs(p)) for p in prefixes]).tolist())
    for i in range(0, 40, 7):
        sample = train[i]
        tokens = sample["tokens"].tolist() + sample["labels"].tolist()[-1:]
        assert len(tokens) == 33 and set(tokens) <= all_ids


def test_verify_tokenizer_catches_a_backend_that_disagrees(
    corpora, tiny_tokenizer_dir, tmp_path, monkeypatch
):
    from sfmed.data import worker

    root, sources = corpora
    one = {"qa": sources["qa"]}
    report = pp.preprocess(_cfg(root, one, tiny_tokenizer_dir, tmp_path / "a", verify_tokenizer=16))
    assert report["sources"]["qa"]["records_kept"] > 16
    real = worker.reference_encoder
    monkeypatch.setattr(worker, "reference_encoder", lambda p: lambda t: [*real(p)(t), 0])
    with pytest.raises(worker.TokenizerMismatchError, match="differ from the reference tokenizer"):
        pp.preprocess(_cfg(root, one, tiny_tokenizer_dir, tmp_path / "b", verify_tokenizer=16))
    assert not list((tmp_path / "b").glob("qa_text_document.*"))


def test_auto_reader_parquet_and_zstd(tmp_path, tiny_tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = qa_rows(50)
    raw = tmp_path / "raw"
    raw.mkdir()
    texts = [r["question"] + r["answer"] for r in rows]
    pq.write_table(
        pa.table({"text": texts[:30] + [None], "n": list(range(31))}),
        raw / "a.parquet",
        row_group_size=8,
    )
    body = b"".join(
        json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n" for t in texts[30:]
    )
    (raw / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    src = {"mixed": SourceConfig(files=["a.parquet", "b.jsonl.zst"])}  # reader=auto
    report = pp.preprocess(
        _cfg(raw, src, tiny_tokenizer_dir, tmp_path / "out", dedup="none", clean=False)
    )
    s = report["sources"]["mixed"]
    assert s["records_read"] == 51 and s["records_kept"] == 50 and s["dropped"]["empty"] == 1
    eod = report["settings"]["tokenizer"]["eod_id"]
    assert read_docs(tmp_path / "out/mixed_text_document") == hf_ids(tiny_tokenizer_dir, texts, eod)


@pytest.mark.parametrize("clean", [False, True])
def test_jsonl_text_field_fast_path_counts_everything(tmp_path, tiny_tokenizer_dir, clean):
    """The fast loop for ``reader=jsonl render=field`` treats odd lines like the general path."""
    lines = [
        b'{"text": "\xe7\xac\xac\xe4\xb8\x80\xe6\x9d\xa1\xe8\xae\xb0\xe5\xbd\x95\xef\xbc\x8c\xe5\x86\x85\xe5\xae\xb9\xe8\xb6\xb3\xe5\xa4\x9f\xe9\x95\xbf"}',
        b"",  # blank: not a record
        b'{"text": "broken',  # malformed
        b'{"text": "bad byte \xff here, long enough"}',  # decode error (dropped)
        b'{"other": "x"}',  # missing field: malformed
        b'{"text": null}',  # empty
        b'{"text": ""}',  # empty
        b'{"text": ["list value", "joined by newline"]}',
        b"[1, 2]",  # a list record is joined (MedDialog's shape)
        b'{"text": "  <p>html and   spaces</p>  "}',
    ]
    f = tmp_path / "raw/x.jsonl"
    f.parent.mkdir()
    f.write_bytes(b"\n".join(lines) + b"\n")
    cfg = PreprocessConfig(
        tokenizer=str(tiny_tokenizer_dir),
        output_dir=str(tmp_path / "out"),
        input=str(f),
        reader="jsonl",
        clean=clean,
        dedup="none",
        cleaning={"min_chars": 2},
    )
    report = pp.preprocess(cfg)
    check_accounting(report)
    s = report["sources"]["x"]
    assert s["records_read"] == 9 and s["invalid_bytes"] == 1
    assert (
        s["dropped"]["malformed"] == 2
        and s["dropped"]["decode_error"] == 1
        and s["dropped"]["empty"] == 2
    )
    samples = "\n".join(s["malformed_samples"])
    assert "x.jsonl:3: invalid JSON" in samples and "x.jsonl:5: missing field 'text'" in samples
    assert "x.jsonl:4: 1 byte(s) invalid in utf-8" in samples
    texts = [
        "第一条记录，内容足够长",
        "list value\njoined by newline",
        "1\n2",
        "  <p>html and   spaces</p>  ",
    ]
    if clean:
        texts[-1] = "html and spaces"
    eod = report["settings"]["tokenizer"]["eod_id"]
    assert read_docs(tmp_path / "out/x_text_document") == hf_ids(tiny_tokenizer_dir, texts, eod)


def _adhoc(tmp_path, tok, f, **kw) -> PreprocessConfig:
    return PreprocessConfig(
        tokenizer=str(tok), output_dir=str(tmp_path / "out"), input=str(f), reader="jsonl", **kw
    )


def test_malformed_share_above_the_limit_rejects_the_source(tmp_path, tiny_tokenizer_dir):
    """Issue 9.2: more than max_malformed_share (default 0.5) malformed/undecodable -> refused."""
    good = [{"text": r["question"] + r["answer"]} for r in qa_rows(4)]
    bad = [{"txt": r["question"] + r["answer"]} for r in qa_rows(5, offset=10)]
    raw = {9: b'{"text": "\xff\xfe invalid utf-8 bytes"}'}  # one decode error
    f = write_jsonl(tmp_path / "raw/mix.jsonl", good + bad, raw_lines=raw)  # 6 of 10 bad
    with pytest.raises(pp.SourceRejectedError) as e:
        pp.preprocess(_adhoc(tmp_path, tiny_tokenizer_dir, f))
    msg = str(e.value)
    assert "source mix: 6 of 10 records (60.0%) are malformed or undecodable" in msg
    assert "max_malformed_share=0.5" in msg and "malformed 5" in msg and "decode errors) 1" in msg
    assert "max_malformed_share=0.65" in msg  # what would accept it
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".preprocess.lock",
        "report.json",
        "report.md",
    ]
    md = (tmp_path / "out/report.md").read_text()
    assert "## Rejected sources (no outputs)" in md and "mix (rejected)" in md

    report = pp.preprocess(_adhoc(tmp_path, tiny_tokenizer_dir, f, max_malformed_share=0.6))
    assert report["sources"]["mix"]["records_kept"] == 4 and "rejected" not in report["sources"]
    assert len(read_docs(tmp_path / "out/mix_text_document")) == 4
    # 4 of 10 bad is under the default limit.
    more = [{"text": r["question"] + r["answer"]} for r in qa_rows(2, offset=20)]
    g = write_jsonl(tmp_path / "raw/ok.jsonl", good + more + bad[:4])
    report = pp.preprocess(_adhoc(tmp_path, tiny_tokenizer_dir, g))
    assert report["sources"]["ok"]["dropped"]["malformed"] == 4
    assert report["sources"]["ok"]["records_kept"] == 6


def test_a_rejected_source_stops_the_run_after_the_complete_ones(
    corpora, tiny_tokenizer_dir, tmp_path
):
    root, sources = corpora
    sources = {
        "book": sources["book"],
        "wrong": SourceConfig(files=["qa/*.jsonl"], reader="jsonl", text_field="content"),
        "exam": sources["exam"],
    }
    with pytest.raises(pp.SourceRejectedError, match="source wrong: 0 of 38 records kept"):
        pp.preprocess(_cfg(root, sources, tiny_tokenizer_dir, tmp_path / "out"))
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "book_text_document.json" in names and "book_text_document.bin" in names
    assert not [n for n in names if n.startswith(("wrong", ".wrong", "exam", ".exam"))]
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert list(report["sources"]) == ["book", "wrong"] and report["sources"]["wrong"]["rejected"]
    assert report["total"]["records_read"] == report["sources"]["book"]["records_read"]


def test_missing_inputs_of_every_source_are_reported_at_once(tmp_path, tiny_tokenizer_dir):
    """Issue 9.18: all missing files/globs in one error, not one per run."""
    (tmp_path / "raw/here").mkdir(parents=True)
    (tmp_path / "raw/here/a.jsonl").write_text('{"text": "x"}\n')
    sources = {
        "a": SourceConfig(files=["here/*.jsonl", "gone/*.jsonl"], reader="jsonl"),
        "b": SourceConfig(files=["nothing.jsonl"], reader="jsonl"),
        "c": SourceConfig(files=["here/a.jsonl"], reader="jsonl"),
    }
    with pytest.raises(InputError) as e:
        pp.preprocess(_cfg(tmp_path / "raw", sources, tiny_tokenizer_dir, tmp_path / "out"))
    lines = str(e.value).splitlines()
    assert lines[0] == "2 inputs are missing:"
    assert "source a:" in lines[1] and "gone/*.jsonl" in lines[1] and "matches no files" in lines[1]
    assert "source b:" in lines[2] and "nothing.jsonl does not exist" in lines[2]
    assert not (tmp_path / "out").exists()


def _tokens_from_sidecars(out: Path) -> dict[str, tuple[str, int, int]]:
    """(group, documents, tokens) of every output, read from the sidecars and .idx headers."""
    from sfmed.data.indexed import read_index_header

    res = {}
    for f in sorted(out.glob("*_text_document.json")):
        meta = json.loads(f.read_text())
        prefix = str(f)[: -len(".json")]
        h = read_index_header(prefix)
        res[meta["source"]] = (meta["group"], h["documents"], h["tokens"])
    return res


def test_report_summary_first_and_merged_over_runs(corpora, tiny_tokenizer_dir, tmp_path):
    """Issues 9.18 and 9.21: the SFMed-shaped summary (corpus, records, tokens, share, group
    subtotals) comes first; a second run into the same folder keeps the first run's sources,
    each with the run that produced it."""
    root, sources = corpora
    out = tmp_path / "out"
    first = {k: sources[k] for k in ("qa", "book")}
    pp.preprocess(_cfg(root, first, tiny_tokenizer_dir, out))
    second = {k: sources[k] for k in ("exam", "chat")}
    report = pp.preprocess(_cfg(root, second, tiny_tokenizer_dir, out, dedup="none"))
    assert list(report["sources"]) == ["exam", "chat", "qa", "book"]
    runs = {n: s["run"] for n, s in report["sources"].items()}
    assert runs["exam"] == runs["chat"] != runs["qa"] == runs["book"]
    assert report["runs"][runs["qa"]]["dedup"] == "exact"
    assert report["runs"][runs["exam"]]["dedup"] == "none"
    check_accounting(report)

    truth = _tokens_from_sidecars(out)
    assert set(truth) == {"qa", "book", "exam", "chat"}
    total = sum(t for _, _, t in truth.values())
    md = (out / "report.md").read_text()
    lines = md.splitlines()
    head = lines.index(
        "| 数据集名称 (corpus) | group | 数据集条数 (records) | 数据集Token数 (tokens) | 占比 (share) |"
    )
    accounting = lines.index("## Accounting")
    assert 0 < head < accounting and all(not ln.startswith("|") for ln in lines[:head])
    rows = {ln.split(" | ")[0].strip("| *"): ln for ln in lines[head + 2 : accounting] if ln}
    for name, (group, docs, tokens) in truth.items():
        cells = [c.strip() for c in rows[name].strip("|").split("|")]
        assert cells[1] == group and cells[2] == f"{docs:,}"
        assert cells[4] == f"{100 * tokens / total:.1f}%"
    for group in ("medical", "general"):
        tokens = sum(t for g, _, t in truth.values() if g == group)
        docs = sum(d for g, d, _ in truth.values() if g == group)
        cells = [c.strip(" *") for c in rows[f"{group} subtotal"].strip("|").split("|")]
        assert cells[2] == f"{docs:,}" and cells[4] == f"{100 * tokens / total:.1f}%"
    assert [c.strip(" *") for c in rows["total"].strip("|").split("|")][4] == "100.0%"
    runs_at = lines.index("## Runs")
    run_lines = [ln for ln in lines[runs_at:] if ln.startswith("- run ")]
    assert len(run_lines) == 2
    assert any("(qa, book)" in ln and "dedup=exact" in ln for ln in run_lines)
    assert any("(exam, chat)" in ln and "dedup=none" in ln for ln in run_lines)

    # A source whose outputs are gone drops out of the merged report.
    for ext in (".json", ".bin", ".idx", ".dedup.npz"):
        (out / f"book_text_document{ext}").unlink()
    report = pp.preprocess(_cfg(root, {"exam": sources["exam"]}, tiny_tokenizer_dir, out))
    assert sorted(report["sources"]) == ["chat", "exam", "qa"]


def test_exact_dedup_compares_whole_long_documents(tmp_path, tiny_tokenizer_dir):
    """Issue 15.8: long documents sharing a 100+ character prefix are different documents;
    exact copies of long documents are duplicates."""
    prefix = "慢性胃炎的治疗原则是去除病因、缓解症状和预防复发，" * 8  # 200 characters
    assert len(prefix) >= 200
    tails = [
        "幽门螺杆菌阳性者应行根除治疗，疗程十四天。" * 6,
        "伴胆汁反流者可加用促胃肠动力药和黏膜保护剂。" * 6,
        "有焦虑抑郁者可考虑心理干预，规律饮食，戒烟限酒。" * 6,
    ]
    docs = [prefix + t for t in tails]
    assert all(len(d) > 300 for d in docs)
    rows = [docs[0], docs[1], docs[0], docs[2], docs[1], prefix + tails[2][:-1]]
    f = write_jsonl(tmp_path / "raw/long.jsonl", [{"text": t} for t in rows])
    report = pp.preprocess(_adhoc(tmp_path, tiny_tokenizer_dir, f, text_field="text"))
    s = report["sources"]["long"]
    assert s["records_kept"] == 4 and s["dropped"]["duplicate"] == 2
    kept = [docs[0], docs[1], docs[2], prefix + tails[2][:-1]]
    eod = report["settings"]["tokenizer"]["eod_id"]
    assert read_docs(tmp_path / "out/long_text_document") == hf_ids(tiny_tokenizer_dir, kept, eod)


def test_empty_outputs_of_an_earlier_run_are_not_reused(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """Outputs with 0 documents (what earlier versions wrote and called complete) are redone,
    and so refused, instead of being reused."""
    f = tmp_path / "raw/empty.jsonl"
    f.parent.mkdir()
    f.write_bytes(b"")
    with monkeypatch.context() as m:
        m.setattr(pp, "rejection", lambda acc, cfg: None)  # the old behaviour
        pp.preprocess(_adhoc(tmp_path, tiny_tokenizer_dir, f))
    assert (tmp_path / "out/empty_text_document.bin").stat().st_size == 0
    with pytest.raises(pp.SourceRejectedError, match="source empty: no records"):
        pp.preprocess(_adhoc(tmp_path, tiny_tokenizer_dir, f))
    assert not list((tmp_path / "out").glob("empty_text_document*"))
