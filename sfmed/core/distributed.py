"""Process group and megatron parallel state: the one place that sets them up.

Every entry point (training, conversion checks, verification) calls :func:`init_distributed`
once and :func:`destroy_distributed` at the end; nothing else in sfmed calls
``initialize_model_parallel``.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sfmed.core import cpu_emulation
from sfmed.core.parallel import validate_parallel_sizes
from sfmed.core.ports import free_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank/world and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'; other values checked and returned."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r} is not one of 'auto', 'cuda', 'cpu'")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device=cuda but no CUDA device is visible; use device=cpu to run under the CPU "
            "emulation (gloo), or check CUDA_VISIBLE_DEVICES / the installed torch build."
        )
    return device


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    vpp: int | None = None,
    device: str = "auto",
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> DistInfo:
    """Initialise torch.distributed (env:// from torchrun) and megatron's parallel state.

    Works without torchrun too (single process, world size 1). ``device='cpu'`` switches on the
    CPU emulation of CUDA and uses gloo; ``'cuda'`` uses NCCL and one GPU per local rank.
    """
    from megatron.core import parallel_state, tensor_parallel

    device = resolve_device(device)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    validate_parallel_sizes(world, tp, pp, cp)

    if device == "cpu":
        cpu_emulation.enable()
        backend, dev = "gloo", torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank)
        backend, dev = "nccl", torch.device("cuda", local_rank)

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port() if world == 1 else 29500))
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            context_parallel_size=cp,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
