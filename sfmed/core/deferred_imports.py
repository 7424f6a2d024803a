"""Work megatron-core does when it is imported that a run may never need, deferred to first use.

Every training rank, conversion and verification process pays for ``import megatron.core``.
Two parts of it are wasted on a machine without CUDA:

* Its fusions are decorated with ``torch.compile`` (``megatron.core.jit.jit_fuser``), and the
  first decoration imports TorchDynamo and Inductor (about 3 s of CPU per process), although
  sfmed turns the fusions off without CUDA. Where no CUDA device is visible, ``jit_fuser``
  becomes :func:`compile_on_first_call`: the function is handed to ``torch.compile`` when it
  is first called — which is when ``torch.compile`` compiles anyway — so nothing changes but
  the time. With CUDA, ``jit_fuser`` stays ``torch.compile``.
* ``megatron.core.inference`` and ``megatron.core.timers`` ``import wandb`` at module level
  (about 0.6 s) to have it at hand. ``import wandb`` now binds the module and its code runs at
  the first attribute access (:class:`_DeferredModule`), so a run with
  ``logging.wandb.mode=disabled`` never executes it.

:func:`install` (called by ``sfmed/__init__.py``, so before any sfmed code imports
megatron-core) puts one finder at the front of ``sys.meta_path`` for these two modules. It
imports nothing heavy itself.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
import threading
import types
from typing import Any

_JIT = "megatron.core.jit"
_LAZY = frozenset({"wandb"})
_EXEC_LOCK = threading.RLock()


def compile_on_first_call(fn: Any = None, **options: Any) -> Any:
    """``torch.compile`` (same arguments), with the call to it made at ``fn``'s first call."""
    if fn is None:
        return functools.partial(compile_on_first_call, **options)
    compiled: list = []
    lock = threading.Lock()

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not compiled:
            with lock:
                if not compiled:
                    import torch

                    # Dynamo builds its torch-function rules once; under the CPU emulation
                    # they must see the real torch.cuda functions, not the stand-ins.
                    from sfmed.core import cpu_emulation

                    cpu_emulation.prepare_dynamo()
                    compiled.append(torch.compile(fn, **options))
        return compiled[0](*args, **kwargs)

    return call


class _JitLoader(importlib.abc.Loader):
    """Runs ``megatron.core.jit``, then defers its ``torch.compile`` where there is no CUDA."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        import torch

        if getattr(module, "jit_fuser", None) is torch.compile and not torch.cuda.is_available():
            module.jit_fuser = compile_on_first_call

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename...: the file loader's
        return getattr(self._loader, name)


class _DeferredModule(types.ModuleType):
    """A module whose code has not run yet: the first attribute it lacks runs it.

    Unlike :class:`importlib.util.LazyLoader`'s modules, the attributes the import system set
    (``__file__``, ``__path__``, ``__spec__``...) are read without loading: ``inspect`` reads
    ``__file__`` of every module in ``sys.modules`` (torch does on each ``register_fake``).
    """

    def __getattr__(self, name: str) -> Any:
        with _EXEC_LOCK:
            if type(self) is _DeferredModule:
                self.__class__ = types.ModuleType
                self.__spec__.loader.wrapped.exec_module(self)
        return getattr(self, name)


class _DeferredLoader(importlib.abc.Loader):
    """Binds the module at import; its code runs at the first attribute access."""

    def __init__(self, loader: Any) -> None:
        self.wrapped = loader

    def create_module(self, spec):
        return self.wrapped.create_module(spec)

    def exec_module(self, module) -> None:
        module.__class__ = _DeferredModule

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _JIT and name not in _LAZY:
            return None
        # The finders after this one decide whether and where the module is (another hook --
        # an editable install, a test hiding a package -- included); this one only wraps.
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        if name == _JIT:
            spec.loader = _JitLoader(spec.loader)
        else:
            spec.loader = _DeferredLoader(spec.loader)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent; no effect on modules already
    imported)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
