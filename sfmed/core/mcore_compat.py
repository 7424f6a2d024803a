"""Every difference between the megatron-core releases sfmed supports, in one place.

sfmed is tested on megatron-core 0.16.1 (Python 3.11) and 0.19.x (Python 3.12); the rest of the
code calls the functions here instead of branching on versions itself. Each decision is keyed on
megatron-core's own API (a function's signature) where one exists, else on the installed version
read from the package metadata (cheap: no ``import megatron.core``).

Release differences handled here:

* ``get_batch_on_this_cp_rank`` (0.19) takes a required ``is_hybrid_cp`` and reads
  ``cp_group=None`` as the *world* group: :func:`get_batch_on_this_cp_rank` always passes the
  context-parallel group (and ``is_hybrid_cp=False`` where the argument exists).
* ``dist_checkpointing.save`` (0.19) defaults to the ``"nvrx"`` async strategy, which needs
  nvidia-resiliency-ext: :func:`dist_save_kwargs` picks megatron-core's own async writer, the one
  0.16 uses, so async saves behave the same on both.
* ``dist_checkpointing.save`` (0.19) keeps the non-tensor ("common") state inside the DCP files
  (``common_state`` object) instead of ``common.pt``, and ``metadata.json`` loses its
  ``common_backend`` fields. 0.19 still reads ``common.pt``; 0.16 reads nothing else. sfmed
  therefore writes what the installed release writes *plus* ``common.pt``
  (:func:`add_legacy_common_state`, :func:`common_state_in_dcp`, :func:`checkpoint_marker`), so a
  checkpoint written under either release loads under both.

On both releases the torch_dist writer's results queue lives in a spawned manager process that
outlives a killed rank; :func:`write_results_queue` makes it die with the rank.

Workarounds for megatron-core's pure-PyTorch optimizer path (no apex, no TE) follow.

Without apex or Transformer Engine, ``get_megatron_optimizer`` falls back to
``torch.optim.AdamW``, whose per-parameter state holds a ``step`` tensor. Two places of
``DistributedOptimizer`` do not expect that in 0.16:

* ``state_dict()`` asserts every parameter already has a ``step`` — true only after the first
  update, so a fresh optimizer can neither be loaded into (resume) nor saved;
* the model-space loaders (``fully_reshardable``, ``fully_sharded_model_space``) hand
  ``_set_main_param_and_optimizer_states`` the tensors without ``step`` (restored separately
  from the param groups) but that method copies every key of the live state, ``step`` included,
  and raises ``KeyError: 'step'``;
* ``load_state_dict()`` gives every parameter the *same* ``step`` tensor object, and PyTorch's
  Adam increments steps in place — after a resume the shared step grows by the number of
  parameters per update, so the bias correction (and every update) differs from an
  uninterrupted run.

All three are fixed here per optimizer instance (nothing global is patched). On GPUs with TE's or
apex's fused Adam neither applies and these functions change nothing.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import logging
import types
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The common (non-tensor) state as megatron-core >= 0.19 stores it inside the DCP files: a
# ShardedObject("common_state", global_shape=(1,), global_offset=(0,)), i.e. this unique key.
COMMON_STATE_KEY = "common_state/shard_0_1"
LEGACY_COMMON_FILE = "common.pt"


@functools.cache
def mcore_version() -> tuple[int, int]:
    """(major, minor) of the installed megatron-core, from its package metadata."""
    version = importlib.metadata.version("megatron-core")
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def common_state_in_dcp(version: tuple[int, int] | None = None) -> bool:
    """Whether megatron-core's ``dist_checkpointing.save`` stores the common state in the DCP
    files (0.19 and later) rather than only in ``common.pt`` (0.16)."""
    return (version or mcore_version()) >= (0, 19)


def checkpoint_marker(version: tuple[int, int] | None = None) -> dict:
    """``metadata.json`` exactly as the installed megatron-core's ``dist_checkpointing.save``
    writes it. Both releases read either form (0.16 defaults the fields 0.19 dropped)."""
    marker = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    if not common_state_in_dcp(version):
        marker |= {"common_backend": "torch", "common_backend_version": 1}
    return marker


def get_batch_on_this_cp_rank(batch: dict, cp_group=None, fn=None) -> dict:
    """megatron-core's ``get_batch_on_this_cp_rank`` with the context-parallel group passed
    explicitly (default: parallel_state's CP group), on every supported release."""
    if fn is None:
        from megatron.core.utils import get_batch_on_this_cp_rank as fn
    if cp_group is None:
        from megatron.core import parallel_state

        cp_group = parallel_state.get_context_parallel_group()
    kwargs = {"cp_group": cp_group}
    if "is_hybrid_cp" in inspect.signature(fn).parameters:  # 0.19: required argument
        kwargs["is_hybrid_cp"] = False  # sfmed packs no per-document sequences
    return fn(batch, **kwargs)


_logged_async_strategy = False


def dist_save_kwargs(async_save: bool, save_fn=None) -> dict:
    """Extra keyword arguments for ``dist_checkpointing.save``.

    Releases whose ``save`` takes ``async_strategy`` (0.19) default it to ``"nvrx"``, which needs
    nvidia-resiliency-ext and its own request queue; sfmed uses megatron-core's own async writer
    (``"mcore"``, the only one 0.16 has) with megatron-core's ``AsyncCallsQueue`` on every release.
    """
    global _logged_async_strategy
    if save_fn is None:
        from megatron.core.dist_checkpointing import save as save_fn
    if "async_strategy" not in inspect.signature(save_fn).parameters:
        return {}
    if async_save and not _logged_async_strategy:
        _logged_async_strategy = True
        nvrx = importlib.util.find_spec("nvidia_resiliency_ext") is not None
        log.info(
            "async checkpoints use megatron-core's own async writer (async_strategy='mcore')%s",
            "; nvidia-resiliency-ext is installed but not used" if nvrx else "",
        )
    return {"async_strategy": "mcore"}


_write_results_manager = None


def _die_with_parent(parent_pid: int) -> None:
    """Manager-process initializer: this process ends with its parent (the rank) and only then.

    The exit signals are ignored: torchrun and Slurm signal a rank's whole process group, and
    the rank answers SIGTERM/USR1 by saving a checkpoint -- through this process. The kernel
    kills it when the rank dies, however the rank dies (Linux ``PR_SET_PDEATHSIG``); a rank
    that exits normally shuts it down."""
    import ctypes
    import ctypes.util
    import os
    import signal
    import sys

    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the rank died before the line above took effect
            os._exit(0)


def write_results_queue(cuda: bool) -> bool:
    """Create the queue megatron-core's torch_dist writer collects its write results through,
    served by a manager process that dies with the rank and, without CUDA, is forked.

    megatron-core (0.16 and 0.19, ``strategies/filesystem_async.py``) creates that queue on a
    process's first save with ``mp.get_context("spawn").Manager()``:

    * only a finalizer at a normal exit stops that manager, so a rank that is SIGKILLed, or that
      leaves with ``os._exit`` when its launcher died, left it (and its resource tracker)
      running for good -- here the kernel kills it with its rank (:func:`_die_with_parent`);
    * the spawned server is a fresh interpreter that re-imports the entry script and torch
      (about 3 s of CPU per rank on every run that saves). Without CUDA fork is safe --
      megatron-core forks its write workers from the same process anyway -- so the manager is
      forked; with CUDA it is spawned, as megatron-core does.

    Call once per rank before the first ``dist_checkpointing.save``; returns whether the queue
    was set here (not when it exists already, or on a release without this module-level queue).
    """
    global _write_results_manager
    import multiprocessing as mp
    import os
    from multiprocessing.managers import SyncManager

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return False
    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return False
    manager = SyncManager(ctx=mp.get_context("spawn" if cuda else "fork"))
    manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    _write_results_manager = manager  # keeps the manager (and its finalizer) alive
    filesystem_async._results_queue = manager.Queue()
    return True


def add_legacy_common_state(ckpt_dir: str | Path) -> bool:
    """Write ``common.pt`` into a checkpoint megatron-core (>= 0.19) saved without it, so that
    megatron-core 0.16 can load it too. Call on one rank once the save is complete; returns
    whether a file was written."""
    ckpt_dir = Path(ckpt_dir)
    target = ckpt_dir / LEGACY_COMMON_FILE
    if target.exists():
        return False
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    from sfmed.core.atomic import atomic_file

    common = load_common_state_dict(str(ckpt_dir))
    with atomic_file(target, "wb") as f:
        torch.save(common, f)
    return True


class _DropLegacyCommonWarning(logging.Filter):
    """megatron-core 0.19 warns that reading ``common.pt`` is deprecated on every load; sfmed
    writes that file on purpose (for 0.16) and 0.19 reads the same state from it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("load_common is deprecated")


logging.getLogger("megatron.core.dist_checkpointing.strategies.common").addFilter(
    _DropLegacyCommonWarning()
)


def _torch_adam_optimizers(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            yield opt, inner


def prime_optimizer_state(optimizer) -> None:
    """Give an untouched PyTorch Adam zero state and ``step`` so it can be (de)serialised."""
    for _, torch_opt in _torch_adam_optimizers(optimizer):
        for group in torch_opt.param_groups:
            for p in group["params"]:
                st = torch_opt.state[p]
                if "step" not in st:
                    st.setdefault("exp_avg", torch.zeros_like(p.data))
                    st.setdefault("exp_avg_sq", torch.zeros_like(p.data))
                    st["step"] = torch.tensor(0.0)


def _set_states_keeping_step(self, model_param, tensors):
    # `step` was already restored from the param groups; copy everything else.
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    state = self.optimizer.state[main_param]
    step = state.pop("step", None) if "step" not in tensors else None
    try:
        type(self)._set_main_param_and_optimizer_states(self, model_param, tensors)
    finally:
        if step is not None:
            state["step"] = step


def fix_torch_adam_loading(optimizer) -> None:
    """Make the model-space optimizer loaders work with PyTorch Adam (see module docstring)."""
    for opt, _ in _torch_adam_optimizers(optimizer):
        if hasattr(opt, "model_param_group_index_map") and not getattr(
            opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False
        ):
            opt._set_main_param_and_optimizer_states = types.MethodType(
                _set_states_keeping_step, opt
            )


def unshare_adam_steps(optimizer) -> None:
    """Give each parameter its own ``step`` tensor after ``optimizer.load_state_dict``."""
    for _, torch_opt in _torch_adam_optimizers(optimizer):
        for st in torch_opt.state.values():
            if "step" in st and torch.is_tensor(st["step"]):
                st["step"] = st["step"].detach().clone()
