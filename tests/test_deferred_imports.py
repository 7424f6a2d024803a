"""What ``sfmed.core.deferred_imports`` defers, and that the deferred code still behaves the same.

Each check that depends on what a fresh interpreter has imported runs in a subprocess (this
pytest process has long imported megatron-core, Dynamo and maybe wandb).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO
from sfmed.core.deferred_imports import compile_on_first_call


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@functools.cache
def _stack_imports_dynamo() -> str:
    """Why there is nothing to defer on this stack ('' when there is): some releases load
    Dynamo/Inductor through another import of megatron-core or sfmed (seen with torch 2.14 and
    megatron-core 0.19), and then the checks of what is *not* imported cannot hold."""
    code = (
        "import sys, sfmed, sfmed.core.cpu_emulation, megatron.core;"
        "print([m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules])"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    out = (
        subprocess.run(
            [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env
        )
        .stdout.strip()
        .splitlines()
    )
    loaded = out[-1] if out else "?"
    if loaded == "[]":
        return ""
    return f"this stack loads {loaded} at import by another route: nothing to defer"


def _needs_deferrable_stack():
    """Skip on a release other than megatron-core 0.16 whose stack has nothing to defer; on 0.16
    (the main stage) the checks must hold, so a regression fails instead of skipping."""
    from sfmed.core.mcore_compat import mcore_version

    if mcore_version()[:2] != (0, 16):
        reason = _stack_imports_dynamo()
        if reason:
            pytest.skip(f"megatron-core {'.'.join(map(str, mcore_version()))}: {reason}")


def test_compile_on_first_call_hands_the_function_to_torch_compile_once(monkeypatch):
    calls = []

    def fake_compile(fn, **options):
        calls.append(options)
        return lambda *a, **k: ("compiled", fn(*a, **k))

    monkeypatch.setattr(torch, "compile", fake_compile)

    @compile_on_first_call
    def double(x):
        """Doc kept."""
        return 2 * x

    class Norm:
        @compile_on_first_call(dynamic=False)
        def scale(self, x):
            return x + 1

    assert calls == []  # decorating compiles nothing
    assert double.__name__ == "double" and double.__doc__ == "Doc kept."
    assert double(3) == ("compiled", 6) and double(4) == ("compiled", 8)
    assert calls == [{}]  # once, at the first call
    assert Norm().scale(1) == ("compiled", 2)  # as a method: self passed through
    assert calls == [{}, {"dynamic": False}]


def test_megatron_jit_fuser_is_deferred_without_cuda_and_computes_the_same():
    """No CUDA: megatron's fusions are decorated without importing Inductor; a deferred
    function compiles at its first call and gives eager PyTorch's values."""
    _needs_deferrable_stack()
    _python("""
        import math, sys, torch
        import sfmed  # installs the finder, as every sfmed entry point does first
        import megatron.core.jit as jit
        from megatron.core.transformer.utils import erf_gelu
        from sfmed.core.deferred_imports import compile_on_first_call
        assert jit.jit_fuser is compile_on_first_call, jit.jit_fuser
        assert "torch._inductor.compile_fx" not in sys.modules
        x = torch.linspace(-3, 3, 7, dtype=torch.float64)
        ref = x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))  # GELU's definition
        # Inductor's C++ compile of erf_gelu itself takes ~10 s on 2 cores: the eager backend
        # shows the deferred wrapper compiles and computes, the undecorated body is megatron's.
        assert torch.allclose(erf_gelu.__wrapped__(x), ref, atol=1e-5)  # its sqrt(2) is 1.41421
        assert "torch._inductor.compile_fx" not in sys.modules
        f = compile_on_first_call(backend="eager")(lambda t: t * 0.5 * (1 + torch.erf(t / 2**0.5)))
        assert "torch._dynamo" not in sys.modules
        assert torch.allclose(f(x), ref) and "torch._dynamo" in sys.modules
    """)


def test_megatron_jit_fuser_stays_torch_compile_with_cuda():
    _python("""
        import torch
        torch.cuda.is_available = lambda: True  # what a GPU machine answers
        import sfmed
        import megatron.core.jit as jit
        assert jit.jit_fuser is torch.compile, jit.jit_fuser
    """)


def test_first_compile_under_cpu_emulation_sees_the_real_cuda_functions():
    """Dynamo is no longer imported when the emulation switches on; the first compile builds
    Dynamo's rule map from the real ``torch.cuda`` functions, then the stand-ins come back."""
    _needs_deferrable_stack()
    _python("""
        import sys, torch
        import sfmed
        from sfmed.core import cpu_emulation
        real = torch.cuda.current_device
        cpu_emulation.enable()
        assert "torch._dynamo" not in sys.modules  # enable() no longer pays for Dynamo
        standin = torch.cuda.current_device
        assert standin is not real and standin() == 0
        from sfmed.core.deferred_imports import compile_on_first_call
        f = compile_on_first_call(backend="eager")(lambda t: t + 1)
        assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
        from torch._dynamo import trace_rules
        rules = trace_rules.get_torch_obj_rule_map()
        assert real in rules and standin not in rules
        assert torch.cuda.current_device is standin  # emulation still on
    """)


def test_wandb_code_runs_at_first_use_only():
    _python("""
        import importlib.metadata, inspect, sys
        import sfmed, megatron.core
        import wandb
        assert "wandb.sdk" not in sys.modules  # bound, not executed
        inspect.getmodule(inspect.getmodule)  # reads every module's __file__
        assert "wandb.sdk" not in sys.modules and wandb.__file__.endswith("__init__.py")
        assert wandb.__version__ == importlib.metadata.version("wandb")
        assert "wandb.sdk" in sys.modules and callable(wandb.init)
    """)


@pytest.mark.parametrize("entry", ["sfmed.train.trainer", "sfmed.recipes.pretrain"])
def test_training_path_does_not_load_what_it_does_not_use(entry):
    """A CPU rank's imports: no Inductor, no wandb code, no transformers."""
    _needs_deferrable_stack()
    _python(f"""
        import sys
        import {entry}
        loaded = [m for m in ("torch._inductor.compile_fx", "wandb.sdk", "transformers")
                  if m in sys.modules]
        assert loaded == [], loaded
    """)
