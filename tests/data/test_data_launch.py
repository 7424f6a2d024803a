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
