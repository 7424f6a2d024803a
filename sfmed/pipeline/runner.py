"""Run a plan: locally (stages one after another, torchrun for training) or as a Slurm chain.

Locally each stage is a child process in its own process group writing ``<out_dir>/logs/
<stage>.log``; Ctrl-C or SIGTERM reaches the running stage (training ranks save a checkpoint
and stop), the manifest records it as interrupted, and the next run resumes it. On Slurm each
stage is one job, chained with ``--dependency=afterok`` (training stages through
``launch/slurm/train.sbatch``, which requeues them before their time limit), and a last job
re-runs the pipeline locally, which finds every stage complete and writes the summary.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from sfmed.config.pipeline import PipelineConfig
from sfmed.core.errors import UserError
from sfmed.pipeline.manifest import Manifest, now
from sfmed.pipeline.plan import Plan, PlannedStage
from sfmed.pipeline.stages.base import REPO, python


class StageFailed(Exception):
    """A stage exited with an error or was interrupted; the message says where its log is."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The stages import the same sfmed as this process.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def prepare(ps: PlannedStage) -> None:
    """Discard a stale output and write the stage's files."""
    if ps.discard and ps.out.exists():
        shutil.rmtree(ps.out) if ps.out.is_dir() else ps.out.unlink()
        ps.discard = False
    from sfmed.core.atomic import atomic_write_text

    for path, text in ps.files.items():
        atomic_write_text(path, text)


def _record(manifest: Manifest, ps: PlannedStage, **fields) -> None:
    manifest.update(
        ps.name,
        kind=ps.kind.kind,
        key=ps.key,
        config={"args": ps.args, "nproc_per_node": ps.cfg.nproc_per_node, "nodes": ps.cfg.nodes},
        inputs=ps.inputs,
        external=ps.external,
        output=str(ps.out),
        **fields,
    )


def reconcile(plan: Plan, manifest: Manifest) -> None:
    """Record as complete the stages that finished after the manifest last heard of them
    (a Slurm job, or a run killed between a stage's end and its record)."""
    for ps in plan.stages:
        rec = manifest.stages.get(ps.name)
        if ps.action == "skip" and rec and rec.get("status") != "complete":
            _record(manifest, ps, status="complete", finished=rec.get("finished") or now(),
                    result=ps.kind.result(ps.out, ps.args))  # fmt: skip


def local_command(ps: PlannedStage) -> list[str]:
    """The full local command line of a stage (torchrun for training stages)."""
    return [python(), *ps.kind.local_prefix(ps.cfg.nproc_per_node), *ps.command]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def run_local(plan: Plan, manifest: Manifest, out_dir: Path, echo=print) -> None:
    """Run the plan's stages in order; raise :class:`StageFailed` at the first that fails."""
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for ps in plan.stages:
        if not ps.runs:
            continue
        if ps.name in manifest.stages and ps.action == "rerun":
            manifest.stages[ps.name].pop("result", None)
        prepare(ps)
        attempts = manifest.stages.get(ps.name, {}).get("attempts", 0) + 1
        log = logs / f"{ps.name}.log"
        cmd = local_command(ps)
        _record(manifest, ps, status="running", started=now(), attempts=attempts, finished=None)
        echo(f"[{ps.name}] {ps.action}: {shlex.join(cmd)}\n[{ps.name}] log: {log}")
        t0 = time.perf_counter()
        rc = _run_child(cmd, log)
        seconds = round(time.perf_counter() - t0, 1)
        complete = ps.kind.is_complete(ps.out, ps.args)
        if rc == 0 and complete:
            _record(manifest, ps, status="complete", finished=now(), seconds=seconds,
                    result=ps.kind.result(ps.out, ps.args))  # fmt: skip
            echo(f"[{ps.name}] complete in {seconds:.0f} s")
            continue
        interrupted = rc in (-signal.SIGINT, -signal.SIGTERM, 130, 143) or (rc == 0)
        status = "interrupted" if interrupted else "failed"
        _record(manifest, ps, status=status, finished=now(), seconds=seconds)
        raise StageFailed(
            f"stage {ps.name} {status} (exit code {rc}); last lines of {log}:\n{_tail(log)}\n"
            f"run the same command again to "
            + ("resume it" if ps.kind.training else "run it again"),
            code=2 if rc == 2 else 1,
        )


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the pipeline process dies (Linux), so a
    killed pipeline never leaves a stage training on unwatched; training ranks save and stop."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _run_child(cmd: list[str], log: Path) -> int:
    """Run ``cmd`` with output appended to ``log``; forward SIGINT/SIGTERM to its group."""
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n=== {now()} {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=_child_env(),
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
        got: list[int] = []

        def forward(signum, _frame):
            got.append(signum)
            with contextlib.suppress(ProcessLookupError):
                # torchrun passes SIGTERM to its ranks, which save a checkpoint and stop.
                os.killpg(proc.pid, signal.SIGTERM)

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            rc = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if got:
            return -got[0]
        return rc


def _sbatch(args: list[str], env: dict[str, str]) -> str:
    try:
        p = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                           env=env, timeout=120)  # fmt: skip
    except FileNotFoundError:
        raise UserError("launcher=slurm needs Slurm's sbatch on PATH") from None
    if p.returncode != 0:
        raise UserError(f"sbatch refused the job: {p.stderr.strip()[-800:]}")
    return p.stdout.strip().split(";")[0]


def run_slurm(
    plan: Plan, manifest: Manifest, cfg: PipelineConfig, argv: list[str], echo=print
) -> list[str]:
    """Submit one job per stage that runs, chained with afterok, then the summary job."""
    logs = Path(cfg.slurm.logs or Path(cfg.out_dir) / "logs").resolve()
    logs.mkdir(parents=True, exist_ok=True)
    common = [f"--output={logs}/%x-%j.out", "--open-mode=append", "--kill-on-invalid-dep=yes"]
    for opt in ("partition", "account", "qos"):
        if getattr(cfg.slurm, opt):
            common.append(f"--{opt}={getattr(cfg.slurm, opt)}")
    common += list(cfg.slurm.extra)
    # Jobs start in this (the submit) directory, where the user's relative paths point; the
    # entry points are given by absolute path.
    env = dict(_child_env(), SFMED_ROOT=os.getcwd(), SFMED_PYTHON=python())
    prev: str | None = None
    jobs = []
    for ps in plan.stages:
        if not ps.runs:
            continue
        prepare(ps)
        dep = [f"--dependency=afterok:{prev}"] if prev else []
        name = [f"--job-name=sfmed-{cfg.recipe.name}-{ps.name}", f"--time={ps.cfg.time}"]
        if ps.kind.training:
            res = [f"--nodes={ps.cfg.nodes}"]
            if cfg.slurm.gpus_per_node > 0:
                res.append(f"--gpus-per-node={cfg.slurm.gpus_per_node}")
            job_env = dict(env, SFMED_NPROC_PER_NODE=str(ps.cfg.nproc_per_node))
            script = [str(REPO / "launch/slurm/train.sbatch"), *ps.command]
        else:
            res = ["--nodes=1", "--ntasks=1"]
            if cfg.slurm.gpus_per_node > 0 and ps.kind.kind == "evaluate":
                res.append("--gpus-per-node=1")
            job_env = env
            script = [f"--wrap={shlex.join([python(), *ps.command])}"]
        job = _sbatch([*common, *name, *res, *dep, *script], job_env)
        _record(manifest, ps, status="submitted", job_id=job, started=now(), finished=None)
        echo(f"[{ps.name}] submitted job {job}" + (f" (after {prev})" if prev else ""))
        jobs.append(job)
        prev = job
    # The last job re-runs this command locally: every stage is then complete, so it only
    # records the results in the manifest and writes the summary.
    keep = [a for a in argv if not a.lstrip("+").startswith("launcher=")]
    again = [python(), str(REPO / "launch/pipeline.py"), *keep, "launcher=local"]
    dep = [f"--dependency=afterok:{prev}"] if prev else []
    job = _sbatch([*common, f"--job-name=sfmed-{cfg.recipe.name}-summary", "--nodes=1",
                   "--ntasks=1", *dep, f"--wrap={shlex.join(again)}"], env)  # fmt: skip
    echo(f"[summary] submitted job {job}; results in {cfg.out_dir}/summary.md")
    jobs.append(job)
    return jobs
