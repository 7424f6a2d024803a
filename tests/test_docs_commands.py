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

# Commands that read nothing from the sandbox and write only their own folder: a second
# doc that shows the same command does not run it again.
SELF_CONTAINED = {"python launch/quickstart.py", "python launch/pipeline.py recipe=tiny_cpu"}
_FIRST = {}
for _c in ALL:
    _FIRST.setdefault(_c.text, _c.id)


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


@pytest.mark.slow
@pytest.mark.parametrize("c", ALL, ids=[c.id for c in ALL])
def test_doc_command_runs(c: DocCommand, sandboxes, judge_env):
    reason = _rule(SKIP, c.text)
    if reason:
        pytest.skip(reason)
    if c.text in SELF_CONTAINED and _FIRST[c.text] != c.id:
        pytest.skip(f"the same self-contained command runs at {_FIRST[c.text]}")
    cmd = c.text
    sandbox = sandboxes(c.doc)
    env = {**judge_env, **c.env}  # the doc's own `export OPENAI_API_KEY=...` wins
    if _rule(COMPOSE, cmd):
        proc = _run(_compose_only(cmd), sandbox, env, timeout=120)
    else:
        proc = _run(cmd, sandbox, env)
    assert proc.returncode == 0, (
        f"{c.id} exited {proc.returncode}: {cmd}\n--- stdout ---\n{proc.stdout[-3000:]}"
        f"\n--- stderr ---\n{proc.stderr[-5000:]}"
    )
