"""Run megatron-core's CUDA-only code paths on CPU (gloo), for tests and laptops.

megatron-core's GPTModel, pipeline schedules, DDP, distributed optimizer and
``dist_checkpointing`` hard-code CUDA: ``torch.cuda.current_device()``, ``device="cuda"``
factories, the CUDA RNG tracker, ``torch.cuda.synchronize`` and
``tensor.type() == 'torch.cuda.FloatTensor'`` asserts. The arithmetic itself is
device-agnostic, so redirecting those requests to the CPU lets the *real* sharded code run at
TP=2, PP=2 with gloo. This is what every CPU test of sfmed relies on.

It is strictly opt-in (``device=cpu`` in configs, or :func:`enable` in tests) and refuses to
switch on when a CUDA device is present: on a GPU machine nothing here is ever active.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import types
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"enabled": False, "mode": None, "saved": {}}

# CPU tensor type name -> the CUDA name megatron's asserts expect.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda_device(dev: Any) -> bool:
    """True for anything that names a CUDA device: 'cuda', 'cuda:1', torch.device('cuda'), 0."""
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.split(":")[0] == "cuda"
    # A bare int is a CUDA ordinal in torch's device arguments.
    return isinstance(dev, int) and not isinstance(dev, bool)


def _cpu_if_cuda(dev: Any) -> Any:
    return torch.device("cpu") if _is_cuda_device(dev) else dev


_GRAD_DESCRIPTOR = torch._C.TensorBase.grad
_NON_LEAF_GRAD = r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch function call."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if getattr(func, "__self__", None) is _GRAD_DESCRIPTOR and not args[0].is_leaf:
            # megatron probes ``.grad`` of activations (hasattr); through this mode torch's
            # non-leaf warning would point here, once per process. Same value, no warning.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NON_LEAF_GRAD, category=UserWarning)
                return func(*args, **kwargs)
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.is_pinned:
            return False
        if func is torch.Tensor.type and len(args) == 1 and "dtype" not in kwargs:
            name = func(*args, **kwargs)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.to:
            # Tensor.to(device, dtype, ...) / to(dtype) / to(other) / to(device=...).
            args = (args[0],) + tuple(_cpu_if_cuda(a) for a in args[1:])
            kwargs.pop("non_blocking", None)
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _FakeStream:
    """Stands in for torch.cuda.Stream / Event: every operation is already synchronous on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def synchronize(self):
        return None

    def wait_stream(self, *args, **kwargs):
        return None

    def wait_event(self, *args, **kwargs):
        return None

    def record_event(self, *args, **kwargs):
        return _FakeStream()

    def record(self, *args, **kwargs):
        return None

    def query(self):
        return True

    def elapsed_time(self, *args):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cpu_get_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _cpu_set_rng_state(state, *args, **kwargs):
    torch.set_rng_state(state)


def _cpu_manual_seed(seed, *args, **kwargs):
    # torch.manual_seed would call torch.cuda.manual_seed_all again: seed the generator directly.
    torch.default_generator.manual_seed(int(seed))


def _noop(*args, **kwargs):
    return None


def _zero(*args, **kwargs):
    return 0


def _in_mode(orig):
    """Run ``orig`` (a custom autograd Function's backward entry) under the emulation mode.

    The autograd engine calls ``backward`` of custom Functions without the Python
    torch-function mode stack, so device requests there (e.g. megatron's sequence-parallel
    gathers allocating on ``torch.cuda.current_device()``) would reach CUDA.
    """

    def apply(self, *args):
        with _CudaToCpuMode():
            return orig(self, *args)

    return apply


def _patches() -> dict[tuple[Any, str], Any]:
    """(owner, attribute) -> replacement. Owners are modules or classes."""
    import torch.autograd.function as autograd_function
    import torch.cuda.random as cuda_random

    cuda = torch.cuda
    fake_nvtx = types.SimpleNamespace(range_push=_noop, range_pop=_noop, range=_nullcontext_factory)
    patch: dict[tuple[Any, str], Any] = {
        (cuda, "current_device"): _zero,
        (cuda, "set_device"): _noop,
        (cuda, "device_count"): lambda: 1,
        (cuda, "synchronize"): _noop,
        (cuda, "empty_cache"): _noop,
        (cuda, "manual_seed"): _cpu_manual_seed,
        (cuda, "manual_seed_all"): _cpu_manual_seed,
        (cuda, "get_rng_state"): _cpu_get_rng_state,
        (cuda, "set_rng_state"): _cpu_set_rng_state,
        (cuda_random, "get_rng_state"): _cpu_get_rng_state,
        (cuda_random, "set_rng_state"): _cpu_set_rng_state,
        (cuda_random, "manual_seed"): _cpu_manual_seed,
        (cuda, "memory_allocated"): _zero,
        (cuda, "max_memory_allocated"): _zero,
        (cuda, "memory_reserved"): _zero,
        (cuda, "max_memory_reserved"): _zero,
        (cuda, "reset_peak_memory_stats"): _noop,
        (cuda, "memory_stats"): lambda *a, **k: {},
        (cuda, "current_stream"): lambda *a, **k: _FakeStream(),
        (cuda, "default_stream"): lambda *a, **k: _FakeStream(),
        (cuda, "Stream"): _FakeStream,
        (cuda, "Event"): _FakeStream,
        (cuda, "stream"): lambda *a, **k: contextlib.nullcontext(),
        (cuda, "nvtx"): fake_nvtx,
    }
    bwd = autograd_function.BackwardCFunction
    for name in ("apply", "apply_boxed"):
        if hasattr(bwd, name):
            patch[(bwd, name)] = _in_mode(getattr(bwd, name))
    try:
        from megatron.core.tensor_parallel import random as mcore_random

        patch[(mcore_random, "_get_cuda_rng_state")] = _cpu_get_rng_state
        patch[(mcore_random, "_set_cuda_rng_state")] = _cpu_set_rng_state
    except ImportError:  # megatron-core absent: plain torch code can still use the mode
        pass
    return patch


def _nullcontext_factory(*args, **kwargs):
    return contextlib.nullcontext()


def _distinct(obj: Any) -> Any:
    """A fresh function object per patched attribute.

    torch._dynamo keys its rule table by object identity and refuses one object registered
    under two torch names, so no replacement may be shared between attributes.
    """
    if isinstance(obj, types.FunctionType):
        return types.FunctionType(
            obj.__code__, obj.__globals__, obj.__name__, obj.__defaults__, obj.__closure__
        )
    return obj


def _prewarm_dynamo_rules() -> None:
    # Build (and cache) dynamo's torch-object rule map from the real torch.cuda functions, so
    # later torch.compile calls never see our replacements in it.
    with contextlib.suppress(Exception):
        from torch._dynamo import trace_rules

        trace_rules.get_torch_obj_rule_map()


def _restore_originals() -> None:
    """Put back every attribute :func:`enable` replaced (call with ``_LOCK`` held)."""
    for (owner, name), orig in _STATE["saved"].items():
        if orig is None:
            with contextlib.suppress(AttributeError):
                delattr(owner, name)
        else:
            setattr(owner, name, orig)


def prepare_dynamo() -> None:
    """Build TorchDynamo's rule map from the real ``torch.cuda`` functions before a
    ``torch.compile`` call (a no-op once built). :func:`enable` does it only where Dynamo is
    already imported (importing it costs seconds, and without CUDA nothing may ever compile,
    see ``sfmed.core.deferred_imports``); this does it later, the stand-ins put aside meanwhile.
    """
    with _LOCK:
        if not _STATE["enabled"]:
            _prewarm_dynamo_rules()
            return
        patched = {key: getattr(key[0], key[1], None) for key in _STATE["saved"]}
        _restore_originals()
        try:
            _prewarm_dynamo_rules()
        finally:
            for (owner, name), repl in patched.items():
                setattr(owner, name, repl)


def is_enabled() -> bool:
    """Whether the CPU emulation is active in this process."""
    return bool(_STATE["enabled"])


def enable(force: bool = False) -> None:
    """Switch on the CUDA→CPU redirection for this process (idempotent).

    Raises if a CUDA device is visible, unless ``force`` (tests of the emulation itself): on a
    GPU the real CUDA code must run.
    """
    with _LOCK:
        if _STATE["enabled"]:
            return
        if torch.cuda.is_available() and not force:
            raise RuntimeError(
                "device=cpu asks for the CPU emulation of CUDA, but a CUDA device is visible; "
                "use device=cuda on this machine (or hide the GPUs with CUDA_VISIBLE_DEVICES='')."
            )
        if "torch._dynamo" in sys.modules:
            _prewarm_dynamo_rules()
        saved = {}
        for (owner, name), repl in _patches().items():
            repl = _distinct(repl)
            saved[(owner, name)] = getattr(owner, name, None)
            setattr(owner, name, repl)
        mode = _CudaToCpuMode()
        mode.__enter__()
        _STATE.update(enabled=True, mode=mode, saved=saved)
        log.debug("CPU emulation of CUDA enabled")


def disable() -> None:
    """Undo :func:`enable` (restores every patched attribute)."""
    with _LOCK:
        if not _STATE["enabled"]:
            return
        _STATE["mode"].__exit__(None, None, None)
        _restore_originals()
        _STATE.update(enabled=False, mode=None, saved={})


@contextlib.contextmanager
def cpu_emulation(force: bool = False):
    """Context manager form of :func:`enable` / :func:`disable`."""
    already = is_enabled()
    enable(force=force)
    try:
        yield
    finally:
        if not already:
            disable()
