"""Core attention for megatron-core's local layer spec through fused kernels.

megatron-core's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` score matrix
and runs softmax in a separate pass. Without Transformer Engine that is the only core attention
megatron-core offers; :class:`SDPAttention` plugs PyTorch's ``scaled_dot_product_attention``
(flash / cuDNN / memory-efficient kernels on GPU, a math fallback on CPU) into the same
``core_attention`` slot of the ``ModuleSpec``, and :class:`FlashAttention` the flash-attn package.
Packed sequences (megatron-core's THD ``PackedSeqParams``, used by SFT) are confined to each
sequence by :func:`packed_attention`.

Both take the tensors ``SelfAttention`` hands to core attention (``[s, b, heads_per_partition,
head_dim]`` queries, ``[s, b, groups_per_partition, head_dim]`` keys/values, already rotated by
RoPE and already split over the TP ranks) and return ``[s, b, heads_per_partition *
head_dim]``, exactly like ``DotProductAttention``. GQA is kept grouped (no repeated K/V copies).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Causal (or masked) GQA attention via ``torch.nn.functional.scaled_dot_product_attention``.

    Same constructor and forward signature as megatron's ``DotProductAttention``, so it is used
    through ``ModuleSpec(core_attention=SDPAttention)``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "context parallelism needs Transformer Engine's attention "
                "(model.transformer_impl=transformer_engine); SDPAttention runs with cp=1"
            )
        if config.window_size is not None:
            raise ValueError("sliding-window attention is not supported by SDPAttention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError("SDPAttention supports only the vanilla softmax")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_groups = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        )
        self.alibi_slopes: torch.Tensor | None = None
        """This rank's ALiBi slopes (see :func:`alibi_slopes`); ``None``: no ALiBi."""
        # apply_query_key_layer_scaling needs nothing here: DotProductAttention divides the
        # scale by the layer number and multiplies the fp32 scores back, i.e. the plain scale.
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def _is_causal(self, attention_mask, attn_mask_type) -> bool:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return attention_mask is None and mask_type == AttnMaskType.causal

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """``[s, b, np, hn]`` q, ``[s, b, ng, hn]`` k/v → ``[s, b, np * hn]``."""
        if packed_seq_params is not None:
            if attention_bias is not None:
                raise ValueError("attention_bias is not supported with packed sequences")
            return packed_attention(self, query, key, value, packed_seq_params)
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAttention")
        sq, b = query.shape[0], query.shape[1]
        # [s, b, h, d] -> [b, h, s, d]: strided views, the kernels accept them.
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        is_causal = self._is_causal(attention_mask, attn_mask_type)
        mask = None
        if not is_causal and attention_mask is not None:
            # megatron's masks are True where attention is NOT allowed; SDPA's the opposite.
            mask = ~attention_mask.bool()
        if self.alibi_slopes is not None:
            mask = self._alibi_bias(q, k, is_causal, mask)
            is_causal = False
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = self.num_heads != self.num_groups
        if gqa and not _SDPA_HAS_GQA:  # torch < 2.5
            rep = self.num_heads // self.num_groups
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        kw = {"enable_gqa": True} if gqa else {}

        def attend():
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
                **kw,
            )

        if dropout_p > 0 and not self.config.sequence_parallel:
            # Same RNG discipline as DotProductAttention: TP ranks drop different heads.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, np, s, hn] -> [s, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)

    def _alibi_bias(self, q, k, is_causal: bool, allowed: torch.Tensor | None) -> torch.Tensor:
        """Additive ``[1 or b, heads, sq, sk]`` bias: ``slope_h * key_position`` (what
        Baichuan-13B adds; softmax is invariant to the per-row shift of ``slope * (j - i)``),
        ``-inf`` where attention is not allowed (the causal future or ``allowed`` False)."""
        sq, sk = q.shape[2], k.shape[2]
        slopes = self.alibi_slopes.to(device=q.device, dtype=torch.float32)
        pos = torch.arange(sk, device=q.device, dtype=torch.float32)
        bias = (slopes[:, None, None] * pos[None, None, :]).expand(-1, sq, -1).unsqueeze(0)
        if is_causal:
            future = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
            bias = bias.masked_fill(future, float("-inf"))
        if allowed is not None:
            bias = bias.masked_fill(~allowed, float("-inf"))
        return bias.to(q.dtype)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al.; the interleaving Baichuan-13B and BLOOM use for a
    head count that is not a power of two)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(power_of_2(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    rest = alibi_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.cat([torch.tensor(power_of_2(closest)), rest])


def enable_alibi(core_attention, num_heads: int, tp_rank: int) -> None:
    """Switch ALiBi on in a layer's core attention: the slopes of the heads this TP rank holds
    (megatron gives rank ``r`` the contiguous heads ``[r * heads_per_rank, ...)``)."""
    if type(core_attention) is not SDPAttention:
        raise ValueError(
            f"ALiBi is implemented in sfmed's SDPA core attention only, not in "
            f"{type(core_attention).__name__}; set model.transformer_impl=local and "
            "model.attention_backend=sdpa"
        )
    per_rank = core_attention.num_heads
    core_attention.alibi_slopes = alibi_slopes(num_heads)[
        tp_rank * per_rank : (tp_rank + 1) * per_rank
    ]


class FlashAttention(SDPAttention):
    """Core attention through the flash-attn package (``flash_attn_func``; GPU, bf16/fp16)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            from flash_attn import flash_attn_func
        except ImportError as e:
            raise ImportError(
                "model.attention_backend=flash needs the flash-attn package "
                "(pip install flash-attn); use attention_backend=sdpa otherwise"
            ) from e
        self._flash = flash_attn_func

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        """Same contract as :meth:`SDPAttention.forward`; causal masks only."""
        if packed_seq_params is not None:
            if attention_bias is not None:
                raise ValueError("attention_bias is not supported with packed sequences")
            return packed_attention(self, query, key, value, packed_seq_params, flash=True)
        if not self._is_causal(attention_mask, attn_mask_type) or attention_bias is not None:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        sq, b = query.shape[0], query.shape[1]
        # flash-attn wants [b, s, h, d] contiguous; it handles GQA (fewer K/V heads) natively.
        q, k, v = (t.transpose(0, 1).contiguous() for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self._flash(q, k, v, dropout_p, softmax_scale=self.softmax_scale, causal=True)
        else:
            out = self._flash(q, k, v, dropout_p, softmax_scale=self.softmax_scale, causal=True)
        return out.transpose(0, 1).reshape(sq, b, self.num_heads * self.head_dim)


# -- packed sequences (THD): attention confined to each sequence of the pack ------------------------


def _segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Sequence index of every token of a pack (``cu_seqlens`` = [0, end_0, end_1, ...])."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device)
    seg = torch.repeat_interleave(ids, lengths)
    if seg.numel() != total:
        raise ValueError(f"cu_seqlens covers {seg.numel()} tokens but the pack holds {total}")
    return seg


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[t, t]`` bool, True where query ``i`` may attend key ``j``: same sequence, ``j <= i``."""
    seg = _segment_ids(cu_seqlens, total)
    pos = torch.arange(total, device=seg.device)
    return (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])


def packed_alibi_bias(slopes: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Additive ``[1, heads, t, t]`` ALiBi bias of a pack: ``slope_h * (j - i)`` where query
    ``i`` may attend key ``j`` (``allowed``, block-causal), ``-inf`` elsewhere. Within a
    sequence this differs from Baichuan's ``slope_h * (key position in the sequence)`` by a
    per-row constant, which softmax ignores; the relative form keeps the values small (exact
    in half precision near the diagonal) however long the pack."""
    t = allowed.shape[0]
    pos = torch.arange(t, device=allowed.device, dtype=torch.float32)
    rel = pos[None, :] - pos[:, None]
    s = slopes.to(device=allowed.device, dtype=torch.float32)
    bias = s[:, None, None] * rel[None]
    return bias.masked_fill(~allowed, float("-inf")).unsqueeze(0)


_FLEX: dict = {}


def _flex_attention(q, k, v, cu_seqlens, scale, gqa):
    """Document-masked causal attention through FlexAttention (GPU: memory linear in t)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        # Compiled once per process; the eager version materialises the scores.
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    t = q.shape[2]
    key = (cu_seqlens.data_ptr(), t)
    if _FLEX.get("mask_key") != key:
        # One block mask per pack, shared by every layer of the forward (same cu_seqlens tensor).
        seg = _segment_ids(cu_seqlens, t)

        def doc_causal(b, h, qi, ki):
            return (seg[qi] == seg[ki]) & (ki <= qi)

        _FLEX["mask"] = create_block_mask(doc_causal, None, None, t, t, device=q.device)
        _FLEX["mask_key"] = key
    return _FLEX["fn"](q, k, v, block_mask=_FLEX["mask"], scale=scale, enable_gqa=gqa)


def packed_attention(
    mod: SDPAttention, query, key, value, params, flash: bool = False
) -> torch.Tensor:
    """Causal attention within each sequence of a THD pack, for :class:`SDPAttention`.

    megatron-core's ``SelfAttention`` hands packed inputs as ``[t, heads, head_dim]`` (batch
    dimension squeezed, RoPE already applied per sequence through ``cu_seqlens``). Kernels:
    ``flash`` (``attention_backend=flash``): flash-attn's varlen kernel on CUDA in bf16/fp16;
    otherwise FlexAttention with a document mask on CUDA (no dropout; memory linear in ``t``);
    else, on CPU, and with ALiBi (``mod.alibi_slopes``; :func:`packed_alibi_bias`), SDPA with a
    dense block-diagonal causal mask (memory ``t^2``).
    Returns ``[t, heads * head_dim]``.
    """
    if params.qkv_format != "thd":
        raise ValueError(f"packed sequences need qkv_format='thd', got {params.qkv_format!r}")
    cu_q, cu_kv = params.cu_seqlens_q, params.cu_seqlens_kv
    if cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_q, cu_kv):
        raise ValueError("self-attention packs need cu_seqlens_q == cu_seqlens_kv")
    t = query.shape[0]
    dropout_p = mod.dropout_p if mod.training else 0.0
    cuda = query.is_cuda
    half = query.dtype in (torch.float16, torch.bfloat16)
    slopes = getattr(mod, "alibi_slopes", None)
    if flash and cuda and half and slopes is None and flash_varlen() is not None:
        cu = cu_q.to(torch.int32)
        max_len = params.max_seqlen_q or int((cu[1:] - cu[:-1]).max())

        def varlen():
            return flash_varlen()(
                query, key, value, cu, cu, max_len, max_len, dropout_p,
                softmax_scale=mod.softmax_scale, causal=True,
            )  # fmt: skip

        out = _with_rng(mod, dropout_p, varlen)
        return out.reshape(t, mod.num_heads * mod.head_dim)
    # [t, h, d] -> [1, h, t, d]
    q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))
    gqa = mod.num_heads != mod.num_groups
    if gqa and not _SDPA_HAS_GQA:
        rep = mod.num_heads // mod.num_groups
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    if cuda and dropout_p == 0.0 and slopes is None and _has_flex():
        context = _flex_attention(q, k, v, cu_q, mod.softmax_scale, gqa)
    else:
        # ALiBi packs take this dense path on every device (a bias over [t, t]).
        mask = block_causal_mask(cu_q, t)
        if slopes is not None:
            mask = packed_alibi_bias(slopes, mask).to(q.dtype)
        kw = {"enable_gqa": True} if gqa else {}

        def dense():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=mod.softmax_scale, **kw
            )

        context = _with_rng(mod, dropout_p, dense)
    # [1, h, t, d] -> [t, h * d]
    return context[0].permute(1, 0, 2).reshape(t, mod.num_heads * mod.head_dim)


def _with_rng(mod, dropout_p, fn):
    if dropout_p > 0 and not mod.config.sequence_parallel:
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return fn()
    return fn()


def flash_varlen():
    """flash-attn's ``flash_attn_varlen_func``, or None when flash-attn is not installed."""
    if "varlen" not in _FLEX:
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            flash_attn_varlen_func = None
        _FLEX["varlen"] = flash_attn_varlen_func
    return _FLEX["varlen"]


def _has_flex() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _sdpa_has_gqa() -> bool:
    import inspect

    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # builtin without a signature: probe instead
        try:
            x = torch.zeros(1, 2, 1, 4)
            F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
            return True
        except TypeError:
            return False


_SDPA_HAS_GQA = _sdpa_has_gqa()
