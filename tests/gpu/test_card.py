"""The GPU card's assembly (runs on CPU): JUnit results, the verdict and the Markdown."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import card

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.train.test_pretrain_gpu" name="test_a" time="3.5"/>
<testcase classname="tests.train.test_pretrain_gpu" name="test_b" time="1.0">
  <failure message="assert 0.41 &gt;= 0.5">trace</failure></testcase>
<testcase classname="tests.convert.test_convert_gpu" name="test_c" time="0.0">
  <skipped message="flash-attn not installed"/></testcase>
</testsuite></testsuites>"""


def _card(tests, benchmarks):
    return {
        "environment": {"device": "NVIDIA H200", "torch": "2.9.0", "megatron_core": "0.16.1"},
        "budget_s": 480, "wall_s": 400.0, "written": "2026-11-30 12:00:00 UTC",
        "tests": {"results": tests}, "benchmarks": benchmarks,
    }  # fmt: skip


def test_junit_outcomes(tmp_path):
    (tmp_path / "j.xml").write_text(JUNIT)
    rows = card.junit_results(tmp_path / "j.xml")
    assert [(r["test"].split("::")[1], r["outcome"]) for r in rows] == [
        ("test_a", "passed"), ("test_b", "failed"), ("test_c", "skipped"),
    ]  # fmt: skip
    assert rows[1]["message"] == "assert 0.41 >= 0.5" and rows[0]["seconds"] == 3.5
    assert card.junit_results(tmp_path / "missing.xml") == []


def test_verdict_and_markdown():
    ok_row = {"shape": "1.5b", "config": "sdpa-mbs2", "tokens_per_s": 51234.0,
              "tflops_per_gpu": 480.2, "mfu": 0.4856, "mfu_causal": 0.431, "mem_gb": 61.0}  # fmt: skip
    benches = {
        "pretrain": {"results": [ok_row, {"shape": "1.5b", "config": "te-mbs2",
                                          "error": "transformer_engine not installed: x"}]},
        "sft": {"packing": {"synthetic": True, "packing": 0.985, "supervised": 0.70},
                "results": [dict(ok_row, config="sdpa-mbs1")]},
        "dpo": {"absent": True, "error": "bench_dpo_gpu.py is not in this checkout"},
    }  # fmt: skip
    passed = [{"test": "t::a", "outcome": "passed", "seconds": 1.0}]
    c = _card(passed, benches)
    assert card.verdict(c) == "pass"  # a missing optional package or benchmark is no failure
    c["verdict"] = card.verdict(c)
    md = card.render_markdown(c)
    assert "| pretrain | 1.5b | sdpa-mbs2 | 51,234 | 480.2 | 48.6% | 43.1% | 61.0 |  |" in md
    assert "synthetic conversations | packing 98.5%" in md and "NVIDIA H200" in md

    failing = _card(passed + [{"test": "t::b", "outcome": "failed", "seconds": 1.0}], {
        "pretrain": {"status": 1, "results": [ok_row]},
        "sft": {"results": [{"shape": "7b-layers", "config": "sdpa-mbs1", "error": "OOM"}]},
    })  # fmt: skip
    v = card.verdict(failing)
    assert v.startswith("FAIL") and "t::b" in v and "MFU target" in v and "OOM" in v


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_refuses_without_a_gpu(tmp_path, capsys):
    assert card.main(["--out", str(tmp_path / "c")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
