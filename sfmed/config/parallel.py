"""Schema of the ``parallel`` group (``conf/parallel/*.yaml``): how the model is split.

World size = tp × pp × cp × dp; dp is what is left of the launched processes. Cross-checks that
need the model or the world size (heads divisible by tp, layers by pp × vpp, ...) happen in
``sfmed.train.plan`` before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sfmed.core.errors import Problems

RECOMPUTE_GRANULARITIES = (None, "selective", "full")
RECOMPUTE_METHODS = (None, "uniform", "block")


@dataclass
class ParallelConfig:
    """Tensor / pipeline / context / data parallelism and activation recomputation."""

    tp: int = 1
    """Tensor-parallel size (divides attention heads and key/value heads)."""

    pp: int = 1
    """Pipeline-parallel size (divides num_layers / vpp)."""

    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B schedule); needs pp > 1."""

    cp: int = 1
    """Context-parallel size (sequence split across ranks); needs Transformer Engine."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism over the TP group (norms/dropout on sequence shards)."""

    use_distributed_optimizer: bool = True
    """Shard optimizer state and fp32 master weights over data-parallel ranks (ZeRO-1)."""

    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce-scatter with the backward pass."""

    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass."""

    bucket_size: int | None = None
    """DDP gradient bucket size in elements (``None`` = megatron's default)."""

    recompute_granularity: str | None = None
    """``None`` (off), ``selective`` (recompute ``recompute_modules``) or ``full`` layers."""

    recompute_method: str | None = None
    """With ``full``: ``uniform`` (chunks of recompute_num_layers) or ``block`` (the first
    recompute_num_layers layers of each stage)."""

    recompute_num_layers: int | None = None
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    """With ``selective``: any of core_attn, mlp, moe_act, layernorm, mla_up_proj, moe,
    shared_experts."""

    def __post_init__(self):
        p = Problems()
        for k in ("tp", "pp", "cp"):
            if getattr(self, k) < 1:
                p.add(f"parallel.{k}={getattr(self, k)} must be >= 1")
        if self.vpp is not None and self.vpp < 1:
            p.add(f"parallel.vpp={self.vpp} must be >= 1 or null")
        if self.vpp is not None and self.vpp > 1 and self.pp == 1:
            p.add(
                f"parallel.vpp={self.vpp} needs pipeline parallelism; set parallel.pp > 1 "
                "or parallel.vpp=null"
            )
        granularity_ok = p.check(
            self.recompute_granularity in RECOMPUTE_GRANULARITIES,
            f"parallel.recompute_granularity={self.recompute_granularity!r} is not one of "
            f"{list(RECOMPUTE_GRANULARITIES)}",
        )
        method_ok = p.check(
            self.recompute_method in RECOMPUTE_METHODS,
            f"parallel.recompute_method={self.recompute_method!r} is not one of "
            f"{list(RECOMPUTE_METHODS)}",
        )
        # How granularity and method combine is only meaningful when both are known values.
        if granularity_ok and method_ok:
            if self.recompute_granularity == "full":
                if self.recompute_method is None or not self.recompute_num_layers:
                    p.add(
                        "parallel.recompute_granularity=full needs parallel.recompute_method "
                        "(uniform|block) and parallel.recompute_num_layers >= 1"
                    )
            elif self.recompute_method is not None:
                p.add(
                    f"parallel.recompute_method={self.recompute_method!r} only applies to "
                    "recompute_granularity=full"
                )
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            p.add(
                "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true"
            )
        p.raise_if_any()

    @property
    def model_parallel_size(self) -> int:
        """Processes per model replica (tp × pp × cp)."""
        return self.tp * self.pp * self.cp
