"""Training checkpoints: megatron-core torch_dist saves in the Megatron-LM folder layout.

Saved top-level keys (as Megatron-LM does): ``model`` (``model0``, ``model1``, ... with virtual
pipeline stages), ``optimizer``, ``opt_param_scheduler``, ``rng_state``, ``checkpoint_version``,
``iteration`` and sfmed's ``train_state`` (data position, loss-guard state); ``sfmed.json`` holds
the architecture, padded vocabulary and parallel layout (the conversion's metadata fields).

A save writes into a hidden ``.iter_N.tmp`` folder; only when every rank has finished (for async
saves: when megatron-core finalises the request) does rank 0 rename it to ``iter_N``, then update
the tracker file, then delete checkpoints beyond ``keep_last``. A crash at any point therefore
leaves the previous checkpoint as the latest complete one, and a reader following the tracker
never sees a partial checkpoint. Model and optimizer state are stored in model space
(``fully_reshardable``), so a run resumes under another TP/PP/DP.
"""

from __future__ import annotations

import logging
import random
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sfmed.core import mcore_compat
from sfmed.core import megatron_layout as layout
from sfmed.core.ckpt_load import load_mcore_weights, model_key
from sfmed.core.mcore_compat import prime_optimizer_state, unshare_adam_steps

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0


def unwrap(chunk):
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def sharded_metadata(sharding_type: str) -> dict:
    """The ``metadata`` Megatron-LM passes to ``sharded_state_dict`` (and stores as content)."""
    return {
        "distrib_optim_sharding_type": sharding_type,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }


def get_rng_state(cuda: bool) -> dict:
    """Every RNG the run draws from (Python, numpy, torch, CUDA, megatron's TP tracker)."""
    from megatron.core import tensor_parallel

    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if cuda else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict, cuda: bool) -> None:
    """Restore :func:`get_rng_state`."""
    from megatron.core import tensor_parallel

    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if cuda and state.get("cuda_rng_state") is not None:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _rng_sharded_object(cuda: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state",
        [get_rng_state(cuda)],
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _model_state(model: list, metadata: dict) -> dict:
    return {
        model_key(i, len(model)): unwrap(m).sharded_state_dict(metadata=metadata)
        for i, m in enumerate(model)
    }


def force_param_sync(model: list) -> None:
    """Complete the distributed optimizer's parameter all-gather now, on every DDP chunk.

    With ``overlap_param_gather`` megatron leaves the all-gather of the updated parameter shards
    to the next forward pass (its pre-hooks), so right after ``optimizer.step()`` each rank's
    model holds the new values only for its own shard. Megatron-LM and Megatron-Bridge force
    the sync before saving for this reason; the next step all-gathers again as usual.
    """
    for chunk in model:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def load_weights(model: list, ckpt_dir: str | Path) -> None:
    """Load only the model weights of a torch_dist checkpoint into ``model`` (any TP/PP/VPP).

    Storage is keyed by each ShardedTensor's global key, so chunk names (``model`` vs
    ``model0``) and the saved TP/PP layout do not matter (:mod:`sfmed.core.ckpt_load`).
    """
    load_mcore_weights([unwrap(m) for m in model], ckpt_dir)


class Checkpointer:
    """Saves and loads the full training state of a run under ``run_dir``."""

    def __init__(
        self,
        run_dir: str | Path,
        model: list,
        optimizer,
        scheduler,
        *,
        meta: dict,
        sharding_type: str = "fully_reshardable",
        keep_last: int | None = None,
        async_save: bool = False,
        cuda: bool = False,
    ):
        self.run_dir = Path(run_dir)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.meta = dict(meta)
        self.sharding_type = sharding_type
        self.keep_last = keep_last
        self.cuda = cuda
        self.rank = dist.get_rank()
        self._queue = None
        # megatron's writer serves its results queue from a manager process: make it one that
        # the kernel stops with this rank (a killed run leaves nothing running), forked on CPU.
        mcore_compat.write_results_queue(cuda)
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()
        self.last_saved: int | None = None

    # -- saving -----------------------------------------------------------------------------

    def _save_strategy(self):
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.serialization import (
            get_default_save_sharded_strategy,
        )
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelSaveStrategyWrapper,
        )

        strategy = get_default_save_sharded_strategy("torch_dist")
        group = ps.get_data_parallel_group(with_context_parallel=True)
        if group.size() > 1:
            # Spread the writing of DP-replicated shards over the DP ranks.
            strategy = FullyParallelSaveStrategyWrapper(strategy, group, True)
        return strategy

    def save(self, iteration: int, train_state: dict) -> None:
        """Save the state after ``iteration`` steps (async when configured)."""
        from megatron.core import dist_checkpointing

        self.maybe_finalize(blocking=True)  # one save in flight at a time
        force_param_sync(self.model)  # saved weights = those after the last update
        final = self.run_dir / layout.iter_dir_name(iteration)
        tmp = self.run_dir / f".{final.name}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        metadata = sharded_metadata(self.sharding_type)
        state = _model_state(self.model, metadata)
        model_sd = state if len(self.model) > 1 else state["model"]
        prime_optimizer_state(self.optimizer)
        state["optimizer"] = self.optimizer.sharded_state_dict(model_sd, metadata=metadata)
        state["opt_param_scheduler"] = self.scheduler.state_dict()
        state["rng_state"] = _rng_sharded_object(self.cuda)
        state["checkpoint_version"] = CHECKPOINT_VERSION
        state["iteration"] = iteration
        state["train_state"] = dict(train_state)
        request = dist_checkpointing.save(
            state,
            str(tmp),
            self._save_strategy(),
            async_sharded_save=self._queue is not None,
            content_metadata=metadata,
            **mcore_compat.dist_save_kwargs(self._queue is not None),
        )
        finalize = partial(self._finalize, tmp, final, iteration)
        if self._queue is not None:
            request.add_finalize_fn(finalize)
            self._queue.schedule_async_request(request)
            log.info("checkpoint of step %d is being written in the background", iteration)
        else:
            finalize()

    def _finalize(self, tmp: Path, final: Path, iteration: int) -> None:
        # Runs on every rank once all shards (and megatron's metadata.json) are on disk.
        if self.rank == 0:
            mcore_compat.add_legacy_common_state(tmp)  # megatron-core 0.16 needs common.pt
            layout.write_meta(tmp, {**self.meta, "iteration": iteration})
            if final.exists():  # an older save of the same step, e.g. after a resume
                old = final.with_name(f".{final.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            layout.write_tracker(self.run_dir, iteration)
            self._prune(iteration)
            log.info("saved checkpoint %s", final)
        self.last_saved = iteration
        dist.barrier()

    def _prune(self, latest: int) -> None:
        if self.keep_last is None:
            return
        iters = sorted(
            int(p.name[len("iter_") :])
            for p in self.run_dir.glob("iter_*")
            if p.is_dir() and p.name[len("iter_") :].isdigit()
        )
        for it in [i for i in iters if i != latest][: max(0, len(iters) - self.keep_last)]:
            shutil.rmtree(self.run_dir / layout.iter_dir_name(it), ignore_errors=True)

    def maybe_finalize(self, blocking: bool = False) -> None:
        """Finalise finished async saves (all ranks must call this together)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        """Wait for any save in flight and finalise it."""
        if self._queue is not None:
            self.maybe_finalize(blocking=True)
            self._queue.close()
            self._queue = None

    # -- loading ----------------------------------------------------------------------------

    def load(self, ckpt_dir: str | Path, *, load_rng: bool = True) -> dict:
        """Restore model, optimizer, scheduler (and RNG) from ``ckpt_dir``; return its state.

        The returned dict holds ``iteration`` and ``train_state`` of the checkpoint.
        """
        from megatron.core import dist_checkpointing

        ckpt_dir = Path(ckpt_dir)
        content = dist_checkpointing.load_content_metadata(str(ckpt_dir)) or {}
        sharding = content.get("distrib_optim_sharding_type") or layout.read_meta(ckpt_dir).get(
            "distrib_optim_sharding_type", self.sharding_type
        )
        metadata = sharded_metadata(sharding)
        request = _model_state(self.model, metadata)
        model_sd = request if len(self.model) > 1 else request["model"]
        prime_optimizer_state(self.optimizer)
        request["optimizer"] = self.optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=metadata
        )
        if load_rng:
            request["rng_state"] = _rng_sharded_object(self.cuda)
        loaded = dist_checkpointing.load(request, str(ckpt_dir))
        for i, m in enumerate(self.model):
            unwrap(m).load_state_dict(loaded[model_key(i, len(self.model))], strict=True)
        self.optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_steps(self.optimizer)
        self.scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if load_rng:
            rng = loaded["rng_state"]
            set_rng_state(rng[0] if isinstance(rng, list) else rng, self.cuda)
        return {
            "iteration": int(loaded["iteration"]),
            "train_state": dict(loaded.get("train_state") or {}),
        }


def clean_incomplete(run_dir: str | Path) -> None:
    """Remove leftovers of interrupted saves (``.iter_*.tmp``); call on rank 0 at start."""
    for p in Path(run_dir).glob(".iter_*"):
        shutil.rmtree(p, ignore_errors=True)
