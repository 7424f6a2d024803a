"""Decisions the training code makes for a GPU machine, checked on CPU by simulating its packages.

A missing or broken optional package is simulated by a fake module in ``sys.modules`` (``None``
there makes ``import`` fail like an absent package) or by hiding packages from the import system
in a subprocess; what is checked is the decision (fusion on/off, flash-attn or SDPA, FP8 recipe
allowed) and that the run gets past set-up. The GPU halves are in tests/train/test_pretrain_gpu.py.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, parse_result

HERE = Path(__file__).parent
REQUIREMENTS = REPO / "tests" / "gpu" / "requirements-gpu-path.txt"
# Installed in the test environment but not on a minimal GPU machine (sfmed --no-deps).
HIDDEN = (
    "orjson", "wandb", "rich", "matplotlib", "datasketch", "gigatoken", "jieba", "pyarrow",
    "zstandard", "rouge_score", "rapidfuzz", "sacrebleu", "openai", "tqdm",
)  # fmt: skip
# Imported only on paths a default GPU run does not take: wandb (logging.wandb.mode=disabled by
# default, lazily imported when enabled) and the optional accelerators the plan detects.
OPTIONAL_IMPORTS = {"wandb", "transformer_engine", "flash_attn", "fused_weight_gradient_mlp_cuda"}


def _pretrain_cfg(**over):
    from omegaconf import OmegaConf

    from sfmed.config.pretrain import PretrainConfig

    cfg = OmegaConf.structured(PretrainConfig)
    cfg.merge_with(OmegaConf.from_dotlist([f"{k}={v}" for k, v in over.items()]))
    return OmegaConf.to_object(cfg)


# -- 1. the training path without optional packages ------------------------------------------------


def _guarded(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return handler.type is None or any(
        isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception")
        for n in names
    )


def _third_party_imports(files: list[str]) -> set[str]:
    """Top-level names the listed modules import (also inside functions), minus the stdlib and
    imports inside ``try: ... except ImportError`` (optional by construction)."""
    names: set[str] = set()

    def visit(node, guarded: bool) -> None:
        if isinstance(node, ast.Try):
            g = guarded or any(_guarded(h) for h in node.handlers)
            for child in node.body:
                visit(child, g)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, guarded)
            return
        if not guarded:
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    for f in files:
        visit(ast.parse(Path(f).read_text()), False)
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("sfmed", "torch")}


def _requirement_names() -> set[str]:
    from packaging.requirements import Requirement

    lines = [ln.strip() for ln in REQUIREMENTS.read_text().splitlines()]
    return {Requirement(ln).name.lower().replace("_", "-") for ln in lines if ln and ln[0] != "#"}


@pytest.mark.slow
def test_training_path_runs_without_optional_packages(tmp_path):
    """The real entry point trains 2 steps with orjson, wandb, rich, ... hidden, the EOD id
    coming from the dataset's sidecar (data.eod_id unset), and everything the loaded sfmed modules
    import is in tests/gpu/requirements-gpu-path.txt."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from sfmed.data.metadata import FORMAT

    prefix = str(tmp_path / "corpus_text_document")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(100):
        doc = np.concatenate([rng.integers(3, 999, size=int(rng.integers(5, 40))), [999]])
        b.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    b.finalize(prefix + ".idx")
    Path(prefix + ".json").write_text(json.dumps({"format": FORMAT, "tokenizer": {"eod_id": 999}}))
    run = tmp_path / "run"
    env = dict(os.environ, SFMED_HIDE=",".join(HIDDEN), CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(HERE / "worker_no_optional.py"), "device=cpu", "model=tiny",
         "data.seq_length=32", "data.num_workers=0", "train.steps=2",
         "train.global_batch_size=2", "train.micro_batch_size=1", "train.save_interval=0",
         "optim.warmup_steps=0", f"data.prefix={prefix}", f"ckpt_dir={run}",
         "logging.level=WARNING", "data.eod_mask_loss=true"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    res = parse_result(proc.stdout)
    assert not set(res["top_level"]) & set(HIDDEN), res["top_level"]  # the blocker worked
    recs = (run / "metrics.jsonl").read_text().splitlines()
    assert len(recs) == 2 and json.loads((run / "status.json").read_text())["status"] == "complete"
    # Everything the training path's own modules import (lazily too) is listed.
    dists = importlib.metadata.packages_distributions()
    needed = set()
    for name in _third_party_imports(res["sfmed_files"]) - OPTIONAL_IMPORTS:
        for d in dists.get(name, [name]):
            needed.add(d.lower().replace("_", "-"))
    missing = needed - _requirement_names()
    assert not missing, f"{REQUIREMENTS.name} lacks {sorted(missing)}"


def test_gpu_requirements_pin_what_megatron_core_declares():
    """The [gpu] extra and the GPU requirements pin Transformer Engine to megatron-core's range."""
    from packaging.requirements import Requirement

    from sfmed.train.plan import megatron_te_range

    declared = megatron_te_range()
    assert declared is not None
    tree = ast.parse((REPO / "setup.py").read_text())
    extras = next(
        kw.value for n in ast.walk(tree) if isinstance(n, ast.Call)
        for kw in n.keywords if kw.arg == "extras_require"
    )  # fmt: skip
    gpu = ast.literal_eval(extras)["gpu"]
    req_lines = [ln for ln in REQUIREMENTS.read_text().splitlines() if ln and ln[0] != "#"]
    for source in (gpu, req_lines):
        te = [Requirement(r) for r in source if r.startswith("transformer-engine")]
        assert len(te) == 1
        spec = te[0].specifier
        # Same bounds as megatron-core's metadata (its floor may carry an a0 pre-release tag).
        for v in ("2.9.0", "2.11.9"):
            assert spec.contains(v) and Requirement(f"x{declared}").specifier.contains(v)
        for v in ("2.8.0", "2.12.0", "2.0.0"):
            assert not spec.contains(v), (spec, v)


# -- 2. gradient-accumulation fusion -------------------------------------------------------------


def _plan(device: str, impl: str = "local"):
    return types.SimpleNamespace(device=device, impl=impl)


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_grad_accum_fusion_only_when_apex_extension_imports(monkeypatch, caplog, impl):
    from sfmed.train.builder import use_grad_accum_fusion

    caplog.set_level(logging.INFO, logger="sfmed.train.builder")
    # Absent (TE installed or not: TE does not ship it): off, and the log says why.
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", None)
    assert use_grad_accum_fusion(_plan("cuda", impl)) is False
    assert "fused_weight_gradient_mlp_cuda" in caplog.text and "off" in caplog.text
    # Present: on for CUDA.
    monkeypatch.setitem(
        sys.modules,
        "fused_weight_gradient_mlp_cuda",
        types.ModuleType("fused_weight_gradient_mlp_cuda"),
    )
    assert use_grad_accum_fusion(_plan("cuda", impl)) is True
    # Never on CPU.
    assert use_grad_accum_fusion(_plan("cpu", impl)) is False


def test_transformer_config_takes_the_fusion_decision(monkeypatch):
    """make_transformer_config passes the decision on (a CUDA plan without apex: off)."""
    from sfmed.train import builder

    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", None)
    cfg = _pretrain_cfg(device="cpu")
    from sfmed.train.plan import make_plan

    plan = make_plan(cfg, _NoDataRecipe(cfg), world_size=1)
    plan.device = "cuda"  # only the decision is exercised; nothing is built
    assert builder.make_transformer_config(cfg, plan).gradient_accumulation_fusion is False
    monkeypatch.setitem(
        sys.modules,
        "fused_weight_gradient_mlp_cuda",
        types.ModuleType("fused_weight_gradient_mlp_cuda"),
    )
    assert builder.make_transformer_config(cfg, plan).gradient_accumulation_fusion is True


class _NoDataRecipe:
    """A recipe that needs no files (the plan's model/parallel decisions are under test)."""

    kind = "pretrain"
    seq_length_setting = "data.seq_length"

    def __init__(self, cfg):
        self.cfg = cfg

    def seq_length(self):
        return 64

    def check_resume(self, meta, where):
        pass

    def resolve(self, plan):
        return None


# -- 3. flash-attn detection ---------------------------------------------------------------------


def _fake_flash(monkeypatch, kind: str):
    """Simulate flash-attn: ``ok`` (flash_attn_func imports), ``namespace`` (a folder without
    the function), ``broken`` (the extension fails to load), ``absent``."""
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a, **k):
        if name == "flash_attn":
            return None if kind == "absent" else importlib.machinery.ModuleSpec("flash_attn", None)
        return real_find_spec(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    if kind == "absent":
        monkeypatch.setitem(sys.modules, "flash_attn", None)
        return
    mod = types.ModuleType("flash_attn")
    if kind == "ok":
        mod.flash_attn_func = lambda *a, **k: None
    elif kind == "broken":

        def __getattr__(name):
            raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice")

        mod.__getattr__ = __getattr__
    monkeypatch.setitem(sys.modules, "flash_attn", mod)


@pytest.mark.parametrize(
    "kind, expect", [("ok", "flash"), ("namespace", "sdpa"), ("broken", "sdpa"), ("absent", "sdpa")]
)
def test_auto_attention_uses_flash_only_when_its_function_imports(
    monkeypatch, caplog, kind, expect
):
    from sfmed.train import plan as plan_mod

    _fake_flash(monkeypatch, kind)
    monkeypatch.setattr(plan_mod, "te_available", lambda: False)
    caplog.set_level(logging.INFO, logger="sfmed.train.plan")
    cfg = _pretrain_cfg(**{"model.transformer_impl": "auto", "model.attention_backend": "auto"})
    impl, attention = plan_mod._resolve_impl(cfg, "cuda", "bf16")
    assert (impl, attention) == ("local", expect)
    if expect == "sdpa":  # the fallback is logged with its reason
        assert "SDPA" in caplog.text and "flash" in caplog.text
        if kind == "broken":
            assert "undefined symbol" in caplog.text
    # fp32 never picks flash-attn
    assert plan_mod._resolve_impl(cfg, "cuda", "fp32")[1] == "sdpa"


@pytest.mark.parametrize("kind", ["namespace", "broken", "absent"])
def test_explicit_flash_with_unusable_install_is_a_config_error(monkeypatch, kind):
    from sfmed.core.errors import ConfigError
    from sfmed.train import plan as plan_mod

    _fake_flash(monkeypatch, kind)
    cfg = _pretrain_cfg(**{"model.transformer_impl": "local", "model.attention_backend": "flash"})
    with pytest.raises(ConfigError, match="attention_backend=flash.*attention_backend=sdpa"):
        plan_mod._resolve_impl(cfg, "cuda", "bf16")


# -- 4. Transformer Engine version per FP8 recipe --------------------------------------------------


@pytest.mark.parametrize(
    "recipe, too_old, enough",
    [
        ("tensorwise", "2.1.0", "2.2.0"),
        ("blockwise", "2.2.1", "2.3.0"),
        ("mxfp8", "2.0.0", "2.1.0"),
    ],
)
def test_fp8_recipe_needs_its_te_version_before_any_work(monkeypatch, recipe, too_old, enough):
    from sfmed.core.errors import ConfigError
    from sfmed.models import specs
    from sfmed.train import plan as plan_mod

    monkeypatch.setattr(plan_mod, "te_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (10, 0))
    cfg = _pretrain_cfg(**{"train.precision": "fp8", "train.fp8_recipe": recipe})
    monkeypatch.setattr(specs, "te_version", lambda: too_old)
    with pytest.raises(ConfigError, match=rf"fp8_recipe={recipe} needs Transformer Engine >= "):
        plan_mod._resolve_precision(cfg, "cuda")
    monkeypatch.setattr(specs, "te_version", lambda: enough)
    assert plan_mod._resolve_precision(cfg, "cuda") == "fp8"
    # delayed works with any TE 2.x
    cfg = _pretrain_cfg(**{"train.precision": "fp8", "train.fp8_recipe": "delayed"})
    monkeypatch.setattr(specs, "te_version", lambda: "2.0.0")
    assert plan_mod._resolve_precision(cfg, "cuda") == "fp8"


def test_te_outside_megatron_core_range_is_logged(caplog):
    from sfmed.train.plan import check_te_version

    caplog.set_level(logging.WARNING, logger="sfmed.train.plan")
    cfg = _pretrain_cfg()
    check_te_version(cfg, "2.10.0")
    assert "outside the range" not in caplog.text
    check_te_version(cfg, "2.12.1")
    assert "Transformer Engine 2.12.1 is outside the range megatron-core supports" in caplog.text
