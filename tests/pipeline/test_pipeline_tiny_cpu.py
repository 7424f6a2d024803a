"""``python launch/pipeline.py recipe=tiny_cpu`` end to end, killed during SFT and run again.

One run of the README's main command (CPT, SFT, DPO, export, evaluation): the pipeline is SIGKILLed once the SFT stage has written
its step-6 checkpoint; the second invocation skips the complete stages, resumes SFT from its
checkpoint and finishes every stage. An uninterrupted SFT run of the same stage config (the
manifest's overrides, another folder) is the reference: the resumed run's losses and its
exported weights must equal it bit for bit (both exported in the test's process, with the
function ``launch/convert.py to=hf`` runs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, _free_port

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def _env() -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _losses(run: Path) -> dict[int, float]:
    rows = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_tiny_cpu_killed_in_sft_resumes_to_the_same_numbers(tmp_path):
    # The command exactly as README.md and docs/pipeline.md give it, run from a folder that
    # looks like the repository root (the docs test leaves it to this test).
    work = tmp_path / "work"
    work.mkdir()
    for d in ("launch", "conf"):
        (work / d).symlink_to(REPO / d)
    out = work / "outputs" / "pipeline" / "tiny_cpu"  # the default out_dir
    cmd = [sys.executable, "launch/pipeline.py", "recipe=tiny_cpu"]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=work)
    ckpt = out / "sft" / "iter_0000006"
    deadline = time.time() + 600
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert ckpt.is_dir(), (tmp_path / "first.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)  # the pipeline dies; its SFT stage is told to stop
    proc.wait()
    log.close()
    man = json.loads((out / "pipeline.json").read_text())
    assert man["stages"]["sft"]["status"] == "running"  # what a crash leaves
    for _ in range(240):  # the orphaned ranks save and leave (status.json, lock released)
        status = json.loads((out / "sft" / "status.json").read_text() or "{}") if (
            out / "sft" / "status.json").is_file() else {}  # fmt: skip
        if status.get("status") in ("interrupted", "complete"):
            break
        time.sleep(0.5)
    assert status.get("status") == "interrupted", status

    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=work, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    plan = {ln.split()[0]: ln for ln in again.stdout.splitlines()[1:11]}
    for stage in ("assets", "convert", "prep_cpt", "cpt", "prep_sft"):
        assert "skip" in plan[stage], plan[stage]
    assert "resume" in plan["sft"] and "run" in plan["dpo"] and "run" in plan["export"], plan

    man = json.loads((out / "pipeline.json").read_text())
    assert all(r["status"] == "complete" for r in man["stages"].values()), man
    assert man["stages"]["sft"]["attempts"] == 2 and man["stages"]["cpt"]["attempts"] == 1
    # the chain: sft starts from cpt's run and trains on prep_sft's data
    assert man["stages"]["sft"]["inputs"]["init_from"]["path"] == str(out / "cpt")
    assert man["stages"]["sft"]["inputs"]["data"]["path"] == str(out / "prep_sft" / "consult_sft")
    for stage in ("cpt", "sft"):
        res = man["stages"][stage]["result"]
        assert res["step"] == 12 and res["loss"] < 0.8 * res["first_loss"], (stage, res)
        assert (out / f"loss_{stage}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dpo = man["stages"]["dpo"]
    assert dpo["inputs"]["init_from"]["path"] == str(out / "sft")
    assert man["stages"]["export"]["inputs"]["src"]["path"] == str(out / "dpo")
    # chosen answers (right drug) end up preferred over rejected ones (wrong drug)
    assert dpo["result"]["rewards/margins"] > 0 and dpo["result"]["loss"] < 0.6931
    assert (out / "loss_dpo.png").is_file()
    summary = (out / "summary.md").read_text()
    assert "## QA-Rouge" in summary and "选择题" in summary and "final" in summary
    report = json.loads((out / "evaluate" / "report.json").read_text())
    assert report  # the suite's report, written last

    # the reference: the same SFT stage config, uninterrupted, in another folder
    ref = tmp_path / "sft_ref"
    args = [a if not a.startswith("ckpt_dir=") else f"ckpt_dir={ref}"
            for a in man["stages"]["sft"]["config"]["args"]]  # fmt: skip
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
         "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
         str(REPO / "launch/sft.py"), *args],
        capture_output=True, text=True, env=_env(), cwd=REPO, timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    resumed, reference = _losses(out / "sft"), _losses(ref)
    assert sorted(reference) == list(range(1, 13))
    assert [resumed[s] for s in range(1, 13)] == [reference[s] for s in range(1, 13)]
    # the resumed and the uninterrupted SFT end with the same weights, so every later stage
    # (DPO, export, evaluation: deterministic) ends with the same numbers too
    # Exported in this process with the function `launch/convert.py to=hf` calls (the pipeline's
    # export stage above ran the entry point): two interpreters fewer to start.
    from sfmed.convert import convert_mcore_to_hf

    for run, dst in ((ref, tmp_path / "export_ref"), (out / "sft", tmp_path / "export_sft")):
        convert_mcore_to_hf(run, dst, progress=False)
    a, b = _weights(tmp_path / "export_sft"), _weights(tmp_path / "export_ref")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
