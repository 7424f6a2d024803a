"""Continued pretraining end to end on CPU (real megatron-core, CPU emulation, gloo).

One uninterrupted reference run (tiny Qwen2 converted from HF, TP=2×PP=2, 30 steps, checkpoints
every 10) serves several checks: the loss falls, checkpoints and metrics are complete, the `to=hf`
export gives transformers the same logits, a run SIGKILLed after step 10 and resumed reproduces
steps 11-30 bit for bit, and resuming its step-20 checkpoint under other layouts (TP=1×DP=2;
TP=2×PP=2 with virtual stages + sequence parallelism + recompute) continues the same curve.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from conftest import REPO, parse_result

pytestmark = pytest.mark.dist

STEPS = 30
COMMON = [
    "device=cpu",
    "model=tiny",
    "data.seq_length=64",
    "data.num_workers=0",
    f"train.steps={STEPS}",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.save_interval=10",
    "optim.lr=3e-3",
    "optim.min_lr=3e-4",
    "optim.warmup_steps=3",
    "logging.level=WARNING",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(
    nproc: int, args: list[str], python: str = sys.executable, default_workers: bool = False
) -> list[str]:
    """torchrun + launch/pretrain.py under ``python``; ``default_workers`` keeps
    data.num_workers at its default (the signal tests: torchrun signals each rank's process
    group, workers included)."""
    common = [a for a in COMMON if not (default_workers and a.startswith("data.num_workers="))]
    return [
        python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_port()}",
        str(REPO / "launch" / "pretrain.py"), *common, *args,
    ]  # fmt: skip


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def pretrain(
    nproc: int, *args: str, timeout: int = 600, python: str = sys.executable
) -> subprocess.CompletedProcess:
    """Run launch/pretrain.py under torchrun; fail the test with its output on error."""
    proc = subprocess.run(
        _cmd(nproc, list(args), python), capture_output=True, text=True, timeout=timeout, env=_env(),
        cwd=REPO,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(
            f"pretrain exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def lines_written(run: Path) -> int:
    """Complete records in metrics.jsonl so far (safe to call while the run writes it)."""
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def metrics(run: Path) -> dict[int, dict]:
    """step -> record of the run's metrics.jsonl."""
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A converted tiny Qwen2 checkpoint and a small repetitive corpus."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from sfmed.convert import convert_hf_to_mcore
    from sfmed.utils.tiny import make_tiny_qwen2

    root = tmp_path_factory.mktemp("pretrain")
    hf = make_tiny_qwen2(root / "hf")
    convert_hf_to_mcore(hf, root / "mcore", tp=1, pp=1, progress=False)
    prefix = str(root / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    patterns = [rng.integers(3, 999, size=int(rng.integers(5, 12))) for _ in range(8)]
    for i in range(400):  # documents repeat a short pattern: quickly learnable
        doc = np.concatenate([np.tile(patterns[i % 8], 6), [999]])
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(prefix + ".idx")
    return {"root": root, "hf": hf, "mcore": root / "mcore", "data": prefix}


@pytest.fixture(scope="module")
def reference(fixtures):
    """The uninterrupted TP=2×PP=2 run (30 steps, checkpoints at 10/20/30, keep the last 2)."""
    run = fixtures["root"] / "ref"
    pretrain(
        4, "parallel=tp2pp2", f"data.prefix={fixtures['data']}",
        f"init_from={fixtures['mcore']}", f"ckpt_dir={run}", "train.keep_last=2",
    )  # fmt: skip
    return run


@pytest.mark.mcore_compat
def test_trains_tp2pp2_from_a_converted_checkpoint(reference):
    m = metrics(reference)
    assert sorted(m) == list(range(1, STEPS + 1))
    losses = [m[s]["loss"] for s in sorted(m)]
    first, last = np.mean(losses[:3]), np.mean(losses[-5:])
    assert last < 0.6 * first, losses  # falls clearly on the repetitive corpus
    rec = m[STEPS]
    for key in ("lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "skipped_steps", "mem_rss_gb"):
        assert rec[key] is not None, key
    assert rec["consumed_samples"] == STEPS * 8 and rec["skipped_steps"] == 0
    assert abs(rec["lr"] - 3e-4) < 1e-9  # cosine reached the floor at the last step
    # Checkpoints: tracker names the last, older ones pruned to keep_last=2, metadata complete.
    assert (reference / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    assert sorted(p.name for p in reference.glob("iter_*")) == ["iter_0000020", "iter_0000030"]
    assert not list(reference.glob(".iter_*"))
    meta = json.loads((reference / "iter_0000030" / "sfmed.json").read_text())
    assert (meta["tp"], meta["pp"], meta["padded_vocab_size"]) == (2, 2, 1024)
    assert meta["arch"]["vocab_size"] == 1000 and meta["iteration"] == STEPS
    assert (reference / "iter_0000030" / "metadata.json").is_file()  # torch_dist marker
    # common state where megatron-core 0.16 reads it, whichever release saved
    assert (reference / "iter_0000030" / "common.pt").is_file()
    assert (reference / "hf" / "config.json").is_file()  # HF side files travel with the run
    assert json.loads((reference / "status.json").read_text())["status"] == "complete"


@pytest.mark.mcore_compat
def test_export_to_hf_gives_transformers_the_same_logits(reference, fixtures):
    """`launch/convert.py to=hf` of the trained run; transformers' logits = megatron's."""
    hf = fixtures["root"] / "export"
    env = _env()
    conv = subprocess.run(
        [sys.executable, str(REPO / "launch/convert.py"), "to=hf", f"src={reference}", f"dst={hf}"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert conv.returncode == 0, conv.stderr[-4000:]
    ver = subprocess.run(
        [sys.executable, str(REPO / "launch/verify.py"), f"hf={hf}", f"mcore={reference}",
         "device=cpu", "dtype=float32"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert ver.returncode == 0, ver.stdout[-2000:] + ver.stderr[-4000:]
    res = parse_result(ver.stdout)
    assert res["passed"], res
    # The export holds the trained weights, not the initial ones.
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(hf).model.embed_tokens.weight
    b = AutoModelForCausalLM.from_pretrained(fixtures["hf"]).model.embed_tokens.weight
    assert not torch.equal(a, b)


@pytest.mark.mcore_compat
def test_sigkill_after_step_10_then_resume_is_bitwise_equal(reference, fixtures):
    """SIGKILL of the launcher's process group (each rank is its own session leader, so that
    alone used to leave them training): the ranks notice and exit; while they lived, a second
    run on the folder was refused by the lock; the resume then reproduces steps 11-30 bit for
    bit and metrics.jsonl holds each step once."""
    run = fixtures["root"] / "killed"
    args = [
        "parallel=tp2pp2", f"data.prefix={fixtures['data']}", f"init_from={fixtures['mcore']}",
        f"ckpt_dir={run}", "train.async_save=true",
    ]  # fmt: skip
    # Every rank sleeps after step 10 (once its checkpoint is complete) until really killed.
    proc = subprocess.Popen(
        _cmd(4, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env=_env({"SFMED_FAULT_SLEEP_AFTER_STEP": "10"}), start_new_session=True,
    )  # fmt: skip
    tracker = run / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 600
    workers, kids = [], []
    try:
        while not (tracker.is_file() and tracker.read_text().strip() == "10"):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.time() < deadline, "no checkpoint at step 10"
            time.sleep(0.2)
        time.sleep(1.0)
        workers = [
            p for p in psutil.Process(proc.pid).children() if "pretrain.py" in " ".join(p.cmdline())
        ]
        assert len(workers) == 4
        # A second run on the same folder while the first holds it: refused, naming the holder.
        holder = json.loads((run / "run.lock").read_text())
        second = subprocess.run(
            _cmd(1, [f"data.prefix={fixtures['data']}", f"ckpt_dir={run}", "parallel.tp=1",
                     "parallel.pp=1"]),
            capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO,
        )  # fmt: skip
        assert second.returncode != 0
        assert f"is in use by another run: pid {holder['pid']} on host" in second.stderr
        assert holder["pid"] in [w.pid for w in workers]
        # What the ranks started (data-loader workers, megatron's checkpoint-writer manager)
        kids = [k for w in workers for k in w.children(recursive=True)]
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group: torchrun only
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"ranks still running after their launcher died: {alive}"
        gone, alive = psutil.wait_procs(kids, timeout=30)
        assert not alive, "left running after their rank died: " + "; ".join(
            f"{k.pid} {' '.join(k.cmdline())[:120]}" for k in alive
        )
    finally:
        for p in [*workers, *kids, psutil.Process(proc.pid) if proc.poll() is None else None]:
            with contextlib.suppress(psutil.NoSuchProcess, AttributeError):
                p.send_signal(signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(metrics(run)) == list(range(1, 11))
    pretrain(4, *args)  # resume=auto: the dead run's lock is taken over
    ref, got = metrics(reference), metrics(run)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # every step once, in order
    for step in range(11, STEPS + 1):
        for key in ("loss", "grad_norm", "lr", "consumed_samples"):
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])


@pytest.mark.mcore_compat
@pytest.mark.parametrize(
    "nproc,layout",
    [
        (2, ["parallel.tp=1", "parallel.pp=1"]),  # TP 2->1, PP 2->1, DP 1->2
        (
            4,
            [
                "parallel=tp2pp2",
                "parallel.vpp=2",
                "parallel.sequence_parallel=true",
                "parallel.recompute_granularity=selective",
                "model.attention_backend=unfused",
            ],
        ),
    ],  # fmt: skip
    ids=["tp1pp1dp2", "tp2pp2vpp2-sp-recompute"],
)
def test_resume_under_another_layout_continues_the_run(reference, fixtures, nproc, layout):
    run = fixtures["root"] / f"reshard{nproc}"
    pretrain(
        nproc, *layout, f"data.prefix={fixtures['data']}",
        f"resume={reference / 'iter_0000020'}", f"ckpt_dir={run}",
    )  # fmt: skip
    ref, got = metrics(reference), metrics(run)
    assert sorted(got) == list(range(21, STEPS + 1))
    for step in got:  # same maths, other reduction order: equal to float rounding
        assert abs(got[step]["loss"] - ref[step]["loss"]) < 1e-5, (step, got[step], ref[step])
        assert abs(got[step]["grad_norm"] / ref[step]["grad_norm"] - 1) < 1e-4
    meta = json.loads((run / "iter_0000030" / "sfmed.json").read_text())
    assert meta["dp"] == (2 if nproc == 2 else 1)


def _interrupt(fixtures, name: str, send, extra=()) -> tuple[str, dict, Path]:
    """Start a long 2-rank run with the default data-loader workers, ``send(proc)`` once 4 steps
    are logged, and return (output, status.json, run dir)."""
    run = fixtures["root"] / name
    args = [
        "parallel.tp=1", "parallel.pp=2", f"data.prefix={fixtures['data']}", f"ckpt_dir={run}",
        "train.steps=2000", "train.save_interval=0", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        _cmd(2, args, default_workers=True), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=REPO, env=_env(), start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 600
    try:
        while lines_written(run) < 4:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.time() < deadline
            time.sleep(0.2)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2 + 2 * 2  # two ranks, each with its 2 default loader workers
        send(proc)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signal.SIGKILL)
    return out, json.loads((run / "status.json").read_text()), run


def _saved_and_interrupted(out: str, status: dict, run: Path) -> None:
    assert status["status"] == "interrupted", out[-3000:]
    it = status["iteration"]
    assert 4 <= it < 2000
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == str(it)
    assert "DataLoader worker" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert "sfmed/" not in "".join(ln for ln in out.splitlines() if ln.lstrip().startswith("File "))
    assert out.count("pretrain: interrupted") == 1, out[-3000:]


def test_sigterm_saves_and_exits(fixtures):
    """Slurm preemption: SIGTERM to torchrun → every rank saves at the next step and exits 0,
    with the default data-loader workers (torchrun signals each rank's whole process group).

    The same run also exercises validation and offline wandb logging.
    """
    extra = ["logging.level=INFO", "data.split=90/10/0", "train.eval_interval=2",
             "train.eval_iters=1", "logging.wandb.mode=offline", "logging.wandb.tags=[ci]"]  # fmt: skip
    out, status, run = _interrupt(
        fixtures, "sigterm", lambda p: p.send_signal(signal.SIGTERM), extra
    )
    _saved_and_interrupted(out, status, run)
    assert out.count("received SIGTERM") == 1  # announced once, by rank 0
    # Not a terminal: progress comes as periodic plain lines (step/total, ETA, tokens).
    assert re.search(r"step \d+/2000 \| loss .*\| ETA \d+:\d\d:\d\d \| [\d.]+k? tokens", out), out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("valid_loss") is not None for r in records)  # validation ran
    run_id = (run / "wandb_run_id.txt").read_text().strip()  # wandb, offline, in the run dir
    assert list((run / "wandb").glob(f"offline-run-*-{run_id}"))


def _mcore_release(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "from importlib.metadata import version; print(version('megatron-core'))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


@pytest.mark.mcore_compat
def test_checkpoints_resume_bitwise_across_megatron_core_releases(reference, fixtures):
    """The reference run's step-20 checkpoint continues under the other environment's
    megatron-core (SFMED_OTHER_PYTHON, e.g. Python 3.11 + 0.16.1 next to 3.12 + 0.19), which saves
    at step 25; that checkpoint continues here again. Both legs reproduce the uninterrupted run
    bit for bit."""
    other = os.environ.get("SFMED_OTHER_PYTHON")
    if not other:
        pytest.skip("SFMED_OTHER_PYTHON is not set (a Python with another megatron-core release)")
    releases = (_mcore_release(sys.executable), _mcore_release(other))
    assert releases[0] != releases[1], f"both environments have megatron-core {releases[0]}"
    data = f"data.prefix={fixtures['data']}"
    there = fixtures["root"] / "other_release"
    pretrain(
        4, "parallel=tp2pp2", data, f"resume={reference / 'iter_0000020'}", f"ckpt_dir={there}",
        "train.save_interval=5", python=other,
    )  # fmt: skip
    back = fixtures["root"] / "back_again"
    pretrain(4, "parallel=tp2pp2", data, f"resume={there / 'iter_0000025'}", f"ckpt_dir={back}")
    ref = metrics(reference)
    for run, steps in ((there, range(21, STEPS + 1)), (back, range(26, STEPS + 1))):
        got = metrics(run)
        assert sorted(got) == list(steps), (run.name, releases)
        for step in steps:
            for key in ("loss", "grad_norm", "lr", "consumed_samples"):
                assert got[step][key] == ref[step][key], (run.name, releases, step, key)


def test_ctrl_c_saves_and_exits_like_sigterm(fixtures):
    """Ctrl-C = SIGINT to the terminal's foreground process group (torchrun's)."""
    out, status, run = _interrupt(
        fixtures, "sigint", lambda p: os.killpg(p.pid, signal.SIGINT), ["logging.level=INFO"]
    )
    _saved_and_interrupted(out, status, run)
    assert out.count("received SIGINT") == 1
    # No per-rank or per-step warnings of libraries (filtered once, in sfmed/core/logging.py).
    assert "Warning: " not in out, out[-3000:]
