"""``python launch/preprocess.py``: the ad-hoc single-source run and user errors (exit code 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from data_fixtures import qa_rows, write_jsonl

from conftest import REPO


def _run(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="0")
    return subprocess.run(
        [sys.executable, str(REPO / "launch/preprocess.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_adhoc_run_and_user_errors(tmp_path, tiny_tokenizer_dir):
    rows = [{"content": r["question"] + r["answer"], "id": i} for i, r in enumerate(qa_rows(50))]
    write_jsonl(tmp_path / "in/med.part1.jsonl", rows[:30])
    write_jsonl(tmp_path / "in/med.part2.jsonl", rows[30:])
    args = [
        f"input={tmp_path}/in/*.jsonl",
        "reader=jsonl",
        "text_field=content",
        f"tokenizer={tiny_tokenizer_dir}",
        "output_dir=out",
        "name=med",
        "workers=1",
    ]
    proc = _run(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["sources"]["med"]["records_kept"] == 50 and report["sources"]["med"]["files"] == 2
    assert (tmp_path / "out/med_text_document.bin").is_file() and "数据集Token数" in proc.stdout
    assert (tmp_path / "out/report.md").is_file()

    bad = _run(*args[:-2], "output_dir=out", "dedup=fuzzy", cwd=tmp_path)
    assert bad.returncode == 2 and "dedup='fuzzy' is not one of" in bad.stderr
    missing = _run(
        "input=nothing/*.jsonl",
        "reader=jsonl",
        f"tokenizer={tiny_tokenizer_dir}",
        "output_dir=out2",
        cwd=tmp_path,
    )
    assert missing.returncode == 2 and "matches no files" in missing.stderr
    assert not (tmp_path / "out2" / "report.json").exists()


def test_ctrl_c_stops_workers_and_leaves_no_outputs(tmp_path, tiny_tokenizer_dir):
    rows = [{"text": f"{r['question']}{r['answer']}" * 20} for r in qa_rows(20000)]
    write_jsonl(tmp_path / "big.jsonl", rows)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [
        sys.executable,
        str(REPO / "launch/preprocess.py"),
        f"input={tmp_path}/big.jsonl",
        "reader=jsonl",
        f"tokenizer={tiny_tokenizer_dir}",
        "output_dir=out",
        "workers=2",
        "chunk_mb=0.1",
    ]
    # A child of a non-interactive shell may inherit SIGINT ignored: restore the default.
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    out = tmp_path / "out"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if out.is_dir() and any(".bin.tmp" in p.name for p in out.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err, err[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [".preprocess.lock"]


def _no_outputs(out, name):
    """Nothing that a training run could take for ``name``: no .bin/.idx/sidecar, no temp."""
    left = [p.name for p in out.iterdir()] if out.is_dir() else []
    assert not [n for n in left if n.startswith((name, f".{name}"))], left


def test_sources_that_yield_nothing_exit_2_without_outputs(tmp_path, tiny_tokenizer_dir):
    """Issue 9.2: empty input, wrong field name, wrong encoding."""
    (tmp_path / "empty.jsonl").write_bytes(b"")
    chat = [{"query": r["question"], "response": r["answer"]} for r in qa_rows(20)]
    write_jsonl(tmp_path / "chat.jsonl", chat)
    text = "\n".join(r["question"] + r["answer"] for r in qa_rows(20)) + "\n"
    (tmp_path / "gb.txt").write_bytes(text.encode("gb18030"))
    tok = f"tokenizer={tiny_tokenizer_dir}"
    cases = [
        (["input=empty.jsonl", "reader=jsonl"], "empty", ["source empty: no records", "0 bytes"]),
        (
            ["input=chat.jsonl", "reader=jsonl", "text_field=text"],
            "chat",
            ["source chat: 0 of 20 records kept", "malformed 20", "missing field 'text'"],
        ),
        (
            ["input=gb.txt", "reader=text", "text_mode=line"],
            "gb",
            ["source gb: 0 of 20 records kept", "decode errors) 20", "encoding=gb18030"],
        ),
    ]
    for args, name, parts in cases:
        proc = _run(*args, tok, "output_dir=out", cwd=tmp_path)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        err = proc.stderr.strip().splitlines()
        assert err[-1].startswith("preprocess: error: source ") and "Traceback" not in proc.stderr
        for part in parts:
            assert part in err[-1], (part, err[-1])
        _no_outputs(tmp_path / "out", name)
        report = json.loads((tmp_path / "out/report.json").read_text())
        assert report["sources"][name]["rejected"] == err[-1].removeprefix("preprocess: error: ")
    # The right encoding keeps every line.
    proc = _run(
        "input=gb.txt",
        "reader=text",
        "text_mode=line",
        "encoding=gb18030",
        tok,
        "output_dir=out",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out/gb_text_document.json").read_text())["documents"] == 20


def test_unknown_corpus_lists_the_corpora(tmp_path):
    """Issue 9.18: exit 2 with the available corpora, not a raw Hydra error."""
    proc = _run("sources=[nosuch,cmexam, 'other']", "tokenizer=t", "output_dir=o", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("preprocess: error:") == 1
    msg = proc.stderr
    assert "['nosuch', 'other']" in msg and "cmexam" in msg and "wiki2019zh" in msg
    assert "Traceback" not in msg and "Hydra" not in msg


def _readme_preprocess_commands(subst: dict[str, str]) -> list[list[str]]:
    """The ``launch/preprocess.py`` commands of README.md's code blocks, as argument lists, with
    the placeholders in ``subst`` replaced."""
    import re
    import shlex

    text = (REPO / "README.md").read_text()
    for k, v in subst.items():
        text = text.replace(k, v)
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            if "launch/preprocess.py" in line:
                out.append(shlex.split(line.split("#")[0]))
    return out


def test_readme_chatmed_example_keeps_every_record(tmp_path, tiny_tokenizer_dir):
    """Issue 9.11: the README's ad-hoc example, run as written on ChatMed-shaped records."""
    subst = {"tokenizer=models/Qwen2-7B": f"tokenizer={tiny_tokenizer_dir}"}
    cmds = _readme_preprocess_commands(subst)
    cmds = [c for c in cmds if any(a.startswith("input=") for a in c)]
    assert len(cmds) == 1, cmds
    args = cmds[0][cmds[0].index("launch/preprocess.py") + 1 :]
    rows = [{"query": r["question"], "response": r["answer"]} for r in qa_rows(20)]
    inp = next(a for a in args if a.startswith("input="))[len("input=") :]
    assert inp.startswith("data/raw/chatmed/") and inp.endswith(".json"), inp
    write_jsonl(tmp_path / "data/raw/chatmed/chatmed.json", rows)
    proc = _run(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "data/indexed/report.json").read_text())
    (src,) = report["sources"].values()
    assert src["records_read"] == 20 and src["records_kept"] == 20


def _doc_block(doc: str, after: str, subst: dict[str, str] | None = None) -> list[list[str]]:
    """The commands of the first ```bash block after the text ``after`` in ``doc``."""
    import re
    import shlex

    text = (REPO / doc).read_text()
    text = text[text.index(after) :]
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    for k, v in (subst or {}).items():
        block = block.replace(k, v)
    return [shlex.split(ln) for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]


def _run_doc_command(cmd: list[str], cwd):
    """A documented ``python ...`` command, as written, from ``cwd`` with this checkout."""
    assert cmd[0] == "python", cmd
    if cmd[1].startswith("launch/"):
        cmd = [cmd[0], str(REPO / cmd[1]), *cmd[2:]]
    env = dict(os.environ, PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="0")
    return subprocess.run(
        [sys.executable, *cmd[1:]], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_docs_make_the_tiny_dataset_for_model_tiny(tmp_path):
    """Issue 9.13: docs/data.md's commands make data/tiny_text_document, whose ids fit
    model=tiny's 1,000-id vocabulary and whose default split has a validation document."""
    import shutil

    from sfmed.data.checks import check_prefix, check_splits, max_token_id
    from sfmed.data.indexed import read_index_header

    shutil.copytree(REPO / "docs", tmp_path / "docs")
    cmds = _doc_block("docs/data.md", "## A tiny dataset for `model=tiny`")
    assert len(cmds) == 2
    for cmd in cmds:
        proc = _run_doc_command(cmd, tmp_path)
        assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
    prefix = tmp_path / "data/tiny_text_document"
    assert check_prefix(prefix, vocab_size=1000) == []
    docs = read_index_header(prefix)["documents"]
    assert docs >= 100 and check_splits(docs, "99,1,0") == []
    assert 0 < max_token_id(prefix) < 600


def test_docs_chinese_fields_command(tmp_path, tiny_tokenizer_dir):
    """Issue 9.9: the documented ``fields={q: '问题', a: '回答'}`` command keeps every record."""
    rows = [{"问题": r["question"], "回答": r["answer"]} for r in qa_rows(10)]
    write_jsonl(tmp_path / "data/raw/qa/qa.jsonl", rows)
    (cmd,) = _doc_block(
        "docs/data.md",
        "Field names may be Chinese",
        {"tokenizer=models/Qwen2-7B": f"tokenizer={tiny_tokenizer_dir}"},
    )
    proc = _run_doc_command(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "data/indexed/report.json").read_text())
    assert report["sources"]["qa"]["records_kept"] == 10
    from data_fixtures import hf_ids, read_docs

    texts = [f"问：{r['问题']}\n答：{r['回答']}" for r in rows]
    eod = report["settings"]["tokenizer"]["eod_id"]
    assert read_docs(tmp_path / "data/indexed/qa_text_document") == hf_ids(
        tiny_tokenizer_dir, texts, eod
    )
