"""Every command in README.md and docs/*.md runs as written.

Each ```bash block of the docs is split into commands (``\\`` continuations joined). A command is
either **run** in a sandbox folder that holds tiny stand-ins at the paths the docs name (a random
Qwen2 under ``models/Qwen2-7B``, a small JSONL corpus under ``data/raw/chatmed``, the evaluation
data sets and answers files of ``tests/docs_fixtures.py``, …; an LLM judge is a local fake
OpenAI-compatible server named by ``$OPENAI_BASE_URL``), or **composed** (``--cfg job``: Hydra
resolves every group and key, nothing runs) when it needs GPUs, a cluster or the user's own
corpora, or **skipped** for a stated reason (installation, the suite itself). A command that matches no rule fails the test, so a new doc command has to be made
runnable or given a reason here. Synopsis lines with ``<placeholders>``, ``[optional]`` parts or
``...`` belong in ```text blocks, which are not run; ``test_every_doc_command_is_classified`` finds
them (and commands with no rule) without running anything.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import docs_fixtures
import pytest

from conftest import REPO
from sfmed.core.ports import free_port

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# (pattern, reason): commands that are not run at all.
SKIP = [
    (r"^pip install", "installation: CI runs the README's set-up on a fresh machine"),
    (r"(^|&&\s*)python -m pytest", "the test suite itself"),
    (r"^tail -f", "follows a live log"),
    (r"(^|\s)(launch/slurm/submit\.sh|sbatch)\s", "needs Slurm: tests/train/test_slurm.py runs the scripts on a real single-node Slurm"),
    (r"tests/benchmarks/", "benchmark: minutes of machine time, run by hand"),
    (r"^python launch/pipeline\.py recipe=tiny_cpu$", "runs as written (killed during SFT, then run again to the end) in tests/pipeline/test_pipeline_tiny_cpu.py"),
    (r"tests/gpu/run_all\.sh", "needs a CUDA device (tests/gpu/test_card.py checks the card on CPU)"),
]  # fmt: skip

# (pattern, reason): commands whose config is composed (groups and keys resolved) but not run.
COMPOSE = [
    (r"--nproc_per_node[ =](8|16|32|64)", "needs a multi-GPU node"),
    (r"model=(qwen2|qwen2_5|qwen3|llama2|baichuan)\S*_\d", "needs a full-size model and GPUs"),
    (r"\bsources=\[", "needs the user's corpora (conf/sources/*.yaml name the published files)"),
    (r"^accelerate launch ", "needs GPUs (one process per GPU)"),
    (r"launch/pipeline\.py .*launcher=slurm", "needs Slurm: tests/pipeline/test_pipeline_slurm.py"),
]

# Env-only lines (``M=/ckpt/x``, ``export X=...``) set variables for the rest of the block.
ASSIGN = re.compile(r"^(export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(\S*)\s*(#.*)?$")


@dataclass
class DocCommand:
    doc: Path
    line: int
    text: str
    env: dict

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def _commands(doc: Path) -> list[DocCommand]:
    out: list[DocCommand] = []
    text = doc.read_text(encoding="utf-8")
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) not in ("bash", "sh", "shell"):
            continue
        first_line = text.count("\n", 0, m.start()) + 2
        env: dict[str, str] = {}
        pending, start = "", first_line
        for i, raw in enumerate(m.group(2).splitlines()):
            line = raw.rstrip()
            if not pending:
                start = first_line + i
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            cmd = (pending + line).strip()
            pending = ""
            if not cmd or cmd.startswith("#"):
                continue
            a = ASSIGN.match(cmd)
            if a:
                env[a.group(2)] = os.path.expandvars(a.group(3))
                continue
            out.append(DocCommand(doc, start, cmd, dict(env)))
    return out


ALL = [c for d in DOCS for c in _commands(d)]

# Commands whose inputs are all in the base sandbox (the same in every doc's copy): a doc that
# shows the same command again does not run it again. Each runs in the doc named here, the one
# whose later commands use its output (the README's tiny pretraining run is the same 100 steps
# docs/training.md runs and then exports).
RUN_ONCE = {
    "python launch/quickstart.py": "docs/compatibility.md",
    "torchrun --nproc_per_node 4 launch/pretrain.py device=cpu model=tiny parallel=tp2pp2 "
    "data.prefix=data/tiny_text_document data.seq_length=256 train.steps=100": "docs/training.md",
}


def _words(cmd: str) -> str:
    return " ".join(cmd.split())  # continuation lines leave runs of spaces


_RUNS_AT = {
    _words(c.text): c.id
    for c in ALL
    if RUN_ONCE.get(_words(c.text)) == str(c.doc.relative_to(REPO))
}


def _rule(rules, cmd: str) -> str | None:
    for pat, reason in rules:
        if re.search(pat, cmd):
            return reason
    return None


def _as_written_problems(cmd: str) -> list[str]:
    """Why ``cmd`` cannot run as written: synopsis parts, ``...``, a script that is not there."""
    out = []
    holders = re.findall(r"<[^<>\n]+>", cmd)
    if holders:
        out.append(f"placeholder(s) {holders}")
    try:
        words = shlex.split(cmd, comments=True)
    except ValueError as e:
        return [*out, f"not a shell command ({e})"]
    if any(w == "..." or w.endswith("=...") for w in words):
        out.append("'...' stands for arguments")
    optional = [w for w in words if w.startswith("[") and w.endswith("]")]
    if optional:
        out.append(f"optional part(s) {optional}")
    absolute = [w for w in words if re.match(r"^([\w.+-]+=)?/", w)]
    if absolute:
        out.append(f"absolute path(s) {absolute}: the reader has relative folders, not ours")
    scripts = [w for w in words if w.startswith("launch/")]
    missing = [w for w in scripts if not (REPO / w).is_file()]
    if missing:
        out.append(f"no such script {missing}")
    return out


def _compose_only(cmd: str) -> list[str]:
    """The Hydra entry's arguments with ``--cfg job`` (no run), launched with this Python."""
    args = shlex.split(cmd)
    if args[:2] == ["accelerate", "launch"]:
        args = ["torchrun", *args[2:]]
    if args[0] == "torchrun":
        args = args[1:]
        while args and args[0].startswith("--"):
            args = args[2:] if "=" not in args[0] else args[1:]
    elif args[0] in ("python", "python3"):
        args = args[1:]
    script, rest = args[0], args[1:]
    return [sys.executable, script, *rest, "--cfg", "job"]


@pytest.fixture(scope="module")
def base_sandbox(tmp_path_factory, tiny_tokenizer_dir):
    """A folder with the inputs the docs name, as tiny stand-ins; ``launch``/``conf`` linked."""
    from sfmed.utils.tiny import make_tiny_qwen2

    root = tmp_path_factory.mktemp("docs_sandbox")
    for d in ("launch", "conf", "docs", "tests"):
        (root / d).symlink_to(REPO / d)
    # Tiny Qwen2 folders with a tokenizer: the user's downloads, and our exported model. The
    # ones the docs evaluate answer "A" and stop (a random one generates 512 tokens per item).
    for name in ("models/Qwen2-7B", "models/Qwen2-7B-Instruct", "export/sfmed-7b-hf"):
        hf = make_tiny_qwen2(root / name, vocab_size=1000)
        for f in tiny_tokenizer_dir.iterdir():
            shutil.copy(f, hf / f.name)
        if name != "models/Qwen2-7B-Instruct":
            docs_fixtures.make_brief_model(hf)
    docs_fixtures.write_all(root)
    _make_tiny_text_document(root / "data", tiny_tokenizer_dir)
    return root


@pytest.fixture(scope="module")
def judge_env():
    """A fake OpenAI-compatible judge for the docs' LLM-judge commands (``$OPENAI_BASE_URL``)."""
    sys.path.insert(0, str(REPO / "tests" / "eval"))
    try:
        from fake_openai_server import FakeOpenAI
    finally:
        sys.path.pop(0)
    with FakeOpenAI(docs_fixtures.judge_policy) as srv:
        yield {"OPENAI_BASE_URL": srv.base_url, "OPENAI_API_KEY": "sk-docs-test"}


@pytest.fixture(scope="module")
def sandboxes(base_sandbox, tmp_path_factory):
    """One copy of the base sandbox per doc file: each doc's commands run in order in its own."""
    made: dict[Path, Path] = {}

    def get(doc: Path) -> Path:
        if doc not in made:
            dst = tmp_path_factory.mktemp("docs_" + doc.stem)
            shutil.copytree(base_sandbox, dst, symlinks=True, dirs_exist_ok=True)
            made[doc] = dst
        return made[doc]

    return get


def _make_tiny_text_document(data_dir: Path, tokenizer_dir: Path) -> None:
    from sfmed.config.data import PreprocessConfig
    from sfmed.data.preprocess import preprocess

    src = data_dir / "tiny.txt"
    lines = [
        f"病例{i}：患者主诉头痛{i % 7}天，伴恶心。查体无异常，建议休息并复诊。" for i in range(600)
    ]
    src.write_text("\n".join(lines), encoding="utf-8")
    preprocess(
        PreprocessConfig(
            input=str(src),
            reader="text",
            text_mode="line",
            name="tiny",
            tokenizer=str(tokenizer_dir),
            output_dir=str(data_dir),
        )
    )


def _run(args, cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    # The sandbox links launch/ and conf/ to this checkout; make `sfmed` this checkout's too.
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH", "")) if p)
    # torchrun reads its options' defaults from PET_*: a free port, not the shared default 29500.
    e["PET_MASTER_PORT"] = str(free_port())
    e.update(env)
    return subprocess.run(
        args,
        cwd=cwd,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
        shell=isinstance(args, str),
    )


def test_every_doc_command_is_classified():
    """A command that is neither runnable nor given a reason fails here (cheap, no runs)."""
    assert ALL, "no ```bash commands found in the docs"
    gone = sorted(set(RUN_ONCE) - set(_RUNS_AT))
    assert not gone, f"RUN_ONCE commands no longer in the doc that runs them: {gone}"
    bad = []
    for c in ALL:
        cmd = c.text
        if _rule(SKIP, cmd):
            continue
        problems = _as_written_problems(cmd)
        problems += [f"absolute path {k}={v}" for k, v in c.env.items() if v.startswith("/")]
        if not _rule(COMPOSE, cmd) and not re.match(
            r"^(python3? (launch/|-c |-m sfmed)|torchrun )", cmd
        ):
            problems.append("no rule: run it from launch/, or add a reason to SKIP/COMPOSE")
        if problems:
            bad.append(f"{c.id}: {cmd}\n    " + "; ".join(problems))
    assert not bad, (
        "doc commands that cannot run as written (synopsis lines belong in ```text blocks, "
        "inputs at the paths the sandbox provides):\n" + "\n".join(bad)
    )


def _skip_reason(c: DocCommand) -> str | None:
    reason = _rule(SKIP, c.text)
    if reason:
        return reason
    key = _words(c.text)
    if key in RUN_ONCE and _RUNS_AT[key] != c.id:
        return f"the same command, on the same inputs, runs at {_RUNS_AT[key]}"
    return None


def _run_doc(cmds: list[DocCommand], sandbox: Path, judge: dict) -> dict[str, tuple]:
    """Run one doc's commands in order in its sandbox: id -> (returncode, stdout, stderr)."""
    out = {}
    for c in cmds:
        env = {**judge, **c.env}  # the doc's own `export OPENAI_API_KEY=...` wins
        if _rule(COMPOSE, c.text):
            proc = _run(_compose_only(c.text), sandbox, env, timeout=120)
        else:
            proc = _run(c.text, sandbox, env)
        out[c.id] = (proc.returncode, proc.stdout, proc.stderr)
    return out


@pytest.fixture(scope="module")
def doc_runs(request, sandboxes, judge_env):
    """The selected commands of every doc, run in order per doc; two docs at a time.

    A doc's commands depend on each other (same sandbox, in order) but docs do not, and each
    command is a single-threaded process (``OMP_NUM_THREADS=1``) or a short torchrun: running
    two docs side by side keeps both cores busy.
    """
    from concurrent.futures import ThreadPoolExecutor

    selected = {
        item.callspec.params["c"].id
        for item in request.session.items
        if item.originalname == "test_doc_command_runs"
    }
    by_doc: dict[Path, list[DocCommand]] = {}
    for c in ALL:
        if c.id in selected and not _skip_reason(c):
            by_doc.setdefault(c.doc, []).append(c)
    # Sandboxes are made here, one thread, before the runs start.
    jobs = [(cmds, sandboxes(doc)) for doc, cmds in by_doc.items()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        # Longest docs first, so the two lanes finish close together.
        jobs.sort(key=lambda j: -len(j[0]))
        futures = {cmds[0].doc: pool.submit(_run_doc, cmds, sb, judge_env) for cmds, sb in jobs}
        yield futures


@pytest.mark.slow
@pytest.mark.parametrize("c", ALL, ids=[c.id for c in ALL])
def test_doc_command_runs(c: DocCommand, doc_runs):
    reason = _skip_reason(c)
    if reason:
        pytest.skip(reason)
    rc, stdout, stderr = doc_runs[c.doc].result()[c.id]
    assert rc == 0, (
        f"{c.id} exited {rc}: {c.text}\n--- stdout ---\n{stdout[-3000:]}"
        f"\n--- stderr ---\n{stderr[-5000:]}"
    )
