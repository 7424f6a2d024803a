"""TP / PP / CP / VPP / world-size checks: the one place that decides whether a split works.

Every check raises :class:`~sfmed.core.errors.ConfigError` naming the numbers and listing the
valid choices, before any process group or model exists. The model-split checks take any object
with megatron's architecture attributes (``num_layers``, ``num_attention_heads``,
``num_query_groups``, ``ffn_hidden_size``), e.g. :class:`sfmed.models.ModelArch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sfmed.core.errors import ConfigError, Problems


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n`` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _positive(**sizes: int | None) -> None:
    p = Problems()
    for name, v in sizes.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            p.add(f"parallel.{name}={v!r} must be an integer >= 1")
    p.raise_if_any()


def validate_parallel_sizes(world_size: int, tp: int, pp: int, cp: int = 1) -> int:
    """Return the data-parallel size, or raise naming the sizes that do not fit ``world_size``."""
    _positive(tp=tp, pp=pp, cp=cp)
    mp = tp * pp * cp
    if world_size % mp:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp*pp*cp = {tp}*{pp}*{cp} = "
            f"{mp}; launch a multiple of {mp} processes (torchrun --nproc_per_node) or choose "
            f"sizes whose product divides {world_size}: {divisors(world_size)}"
        )
    return world_size // mp


def valid_tp(arch: Any) -> list[int]:
    """The TP sizes megatron-core's attention can split ``arch`` into.

    TP divides the query heads and is a multiple or a divisor of the query groups
    (``transformer_config.py``); when TP exceeds the groups, each rank all-gathers the fused QKV
    and keeps its own query heads (``attention.py``), so the fused ``linear_qkv`` rows must also
    split evenly.
    """
    heads, groups = arch.num_attention_heads, arch.num_query_groups
    head_dim = getattr(arch, "kv_channels", None) or 1
    qkv_rows = (heads + 2 * groups) * head_dim
    return [
        t for t in divisors(heads) if (groups % t == 0 or t % groups == 0) and qkv_rows % t == 0
    ]


def validate_parallel(
    arch: Any, tp: int, pp: int, layers_per_stage: Sequence[int] | None = None
) -> None:
    """Raise :class:`ConfigError` naming the numbers when ``arch`` cannot be split TP×PP ways."""
    _positive(tp=tp, pp=pp)
    # The TP split (heads/ffn) and the PP split (layers) are independent: report both.
    p = Problems()
    heads, groups = arch.num_attention_heads, arch.num_query_groups
    if tp not in valid_tp(arch):
        if heads % tp:
            why = f"does not divide num_attention_heads={heads}"
        elif groups % tp and tp % groups:
            why = (
                f"does not divide num_key_value_heads (query groups)={groups} and is not a "
                "multiple of it (megatron-core needs one or the other)"
            )
        else:
            why = (
                f"does not divide the fused QKV rows (num_attention_heads + 2 * query groups) "
                f"* head_dim = {(heads + 2 * groups) * (getattr(arch, 'kv_channels', None) or 1)}"
            )
        p.add(f"parallel.tp={tp} {why}; valid tp for this model: {valid_tp(arch)}")
    elif arch.ffn_hidden_size % tp:  # one message per bad tp: the attention's comes first
        p.add(
            f"parallel.tp={tp} does not divide intermediate_size (ffn)={arch.ffn_hidden_size}; "
            f"valid tp: {[d for d in divisors(arch.ffn_hidden_size) if d <= 64]}"
        )
    n_layers = arch.num_layers
    if layers_per_stage is not None:
        layers_per_stage = list(layers_per_stage)
        if len(layers_per_stage) != pp or sum(layers_per_stage) != n_layers:
            p.add(
                f"layers_per_stage={layers_per_stage} must have parallel.pp={pp} entries summing "
                f"to num_layers={n_layers}"
            )
        if any(n < 1 for n in layers_per_stage):
            p.add(f"layers_per_stage={layers_per_stage}: every stage needs >= 1 layer")
        if len(set(layers_per_stage[1:-1])) > 1:
            p.add(
                f"layers_per_stage={layers_per_stage}: megatron-core sets the first and last stage "
                "freely, but the middle stages must hold equal numbers of layers"
            )
    elif pp > n_layers:
        p.add(f"parallel.pp={pp} exceeds num_layers={n_layers}; valid pp: {divisors(n_layers)}")
    elif n_layers % pp:
        p.add(
            f"parallel.pp={pp} does not divide num_layers={n_layers}; valid pp: "
            f"{divisors(n_layers)} (or give an uneven layout with layers_per_stage)"
        )
    p.raise_if_any()


def validate_vpp(
    num_layers: int, pp: int, vpp: int | None, num_microbatches: int | None = None
) -> int | None:
    """Check virtual pipeline stages; return the effective vpp (``None`` when off or 1).

    Every virtual stage must hold the same number of layers, and the interleaved schedule needs
    the number of micro-batches to be a multiple of ``pp``.
    """
    _positive(pp=pp, vpp=vpp)
    if vpp is None or vpp == 1:
        return None
    if pp == 1:
        raise ConfigError(
            f"parallel.vpp={vpp} needs pipeline parallelism; set parallel.pp > 1 or "
            "parallel.vpp=null"
        )
    p = Problems()
    if num_layers % (pp * vpp):
        valid = [v for v in divisors(num_layers // pp) if num_layers % pp == 0] or None
        p.add(
            f"parallel.pp*vpp = {pp}*{vpp} does not divide num_layers={num_layers}; choose vpp "
            f"so that every virtual stage gets the same number of layers (valid vpp at "
            f"pp={pp}: {valid})"
        )
    if num_microbatches is not None and num_microbatches % pp:
        p.add(
            f"parallel.vpp={vpp}: the interleaved schedule needs the number of micro-batches "
            f"({num_microbatches} = global_batch_size / (micro_batch_size × dp)) to be a "
            f"multiple of parallel.pp={pp}; raise train.global_batch_size"
        )
    p.raise_if_any()
    return vpp


def validate_sequence_split(
    seq_length: int,
    tp: int,
    cp: int = 1,
    sequence_parallel: bool = False,
    impl: str = "local",
) -> None:
    """Check how the sequence is split: sequence parallelism over TP ranks, context parallelism
    (Transformer Engine only) over CP ranks in 2×cp load-balanced chunks."""
    _positive(tp=tp, cp=cp)
    p = Problems()
    if sequence_parallel and tp > 1 and seq_length % tp:
        p.add(
            f"data.seq_length={seq_length} is not divisible by parallel.tp={tp} "
            "(sequence parallelism splits the sequence over TP ranks)"
        )
    if cp > 1:
        if impl != "transformer_engine":
            p.add(
                f"parallel.cp={cp} needs Transformer Engine attention "
                "(model.transformer_impl=transformer_engine); set parallel.cp=1"
            )
        if seq_length % (2 * cp):
            p.add(f"data.seq_length={seq_length} must be divisible by 2 × parallel.cp")
    p.raise_if_any()
