"""The built-in demo: a tiny random Qwen2 goes to Megatron TP x PP and back, checked on the way.

1. build a tiny random Qwen2 and a small tokenizer (nothing downloaded);
2. convert it to a Megatron checkpoint at tp x pp;
3. load that into megatron-core's GPTModel at tp x pp (torchrun; CPU emulation without GPUs)
   and compare its logits with transformers';
4. convert the checkpoint back to HF and check every tensor is bit-identical.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sfmed.config.convert import QuickstartConfig
from sfmed.convert.hf_to_mcore import convert_hf_to_mcore
from sfmed.convert.mcore_to_hf import convert_mcore_to_hf
from sfmed.convert.verify import verify_conversion
from sfmed.core.errors import ConfigError

log = logging.getLogger(__name__)

MARKER = ".sfmed-quickstart"


@dataclass
class QuickstartReport:
    """Every step's outcome; ``passed`` only when all checks pass."""

    lines: list[str] = field(default_factory=list)
    passed: bool = True

    def add(self, ok: bool, text: str) -> None:
        self.lines.append(f"[{'ok' if ok else 'FAIL'}] {text}")
        self.passed &= ok


def _prepare_workdir(workdir: Path) -> None:
    """Rebuild a workdir the quickstart made before; refuse any other non-empty folder."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).is_file():
            raise ConfigError(
                f"workdir={workdir} is not empty and was not made by the quickstart; choose "
                "another workdir=..."
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by launch/quickstart.py; rebuilt on every run\n")


def compare_hf_folders(a: Path, b: Path) -> list[str]:
    """Differences between the tensors of two HF folders (names, shapes, dtypes, values)."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():  # noqa: SIM118 (safe_open is not iterable)
                    out[k] = h.get_tensor(k)
        return out

    ta, tb = tensors(a), tensors(b)
    diffs = [f"only in {a.name}: {k}" for k in sorted(set(ta) - set(tb))]
    diffs += [f"only in {b.name}: {k}" for k in sorted(set(tb) - set(ta))]
    for k in sorted(set(ta) & set(tb)):
        x, y = ta[k], tb[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            diffs.append(f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
    return diffs


def run_quickstart(cfg: QuickstartConfig) -> QuickstartReport:
    """Run the demo in ``cfg.workdir``; returns the report (never raises on a failed check)."""
    from sfmed.utils.tiny import make_tiny_qwen2, make_tiny_tokenizer

    t0 = time.perf_counter()
    workdir = Path(cfg.workdir)
    device = cfg.device
    if device == "auto":
        enough = torch.cuda.is_available() and torch.cuda.device_count() >= cfg.tp * cfg.pp
        device = "cuda" if enough else "cpu"
    _prepare_workdir(workdir)
    report = QuickstartReport()

    hf = make_tiny_qwen2(workdir / "hf", seed=cfg.seed)
    make_tiny_tokenizer(hf)
    report.add(True, f"tiny random Qwen2 + tokenizer: {hf}")

    mcore = workdir / f"mcore-tp{cfg.tp}pp{cfg.pp}"
    s = convert_hf_to_mcore(hf, mcore, tp=cfg.tp, pp=cfg.pp, progress=False)
    report.add(True, s.line())

    result = verify_conversion(hf, mcore, tp=cfg.tp, pp=cfg.pp, device=device)
    report.add(
        result.passed,
        f"megatron-core GPTModel at tp={cfg.tp} pp={cfg.pp} ({device}) vs transformers: "
        + result.line(),
    )

    back = workdir / "hf-roundtrip"
    s = convert_mcore_to_hf(mcore, back, progress=False)
    report.add(True, s.line())
    diffs = compare_hf_folders(hf, back)
    report.add(
        not diffs,
        "HF -> Megatron -> HF is bit-exact (every tensor: name, shape, dtype, value)"
        if not diffs
        else f"round trip differs in {len(diffs)} tensor(s): {diffs[:3]}",
    )
    tok_same = all(
        (back / p.name).is_file() and (back / p.name).read_bytes() == p.read_bytes()
        for p in hf.glob("tokenizer*")
    )
    report.add(tok_same, "tokenizer files travel with the checkpoint and come back unchanged")
    report.lines.append(f"done in {time.perf_counter() - t0:.1f} s; outputs in {workdir}")
    return report
