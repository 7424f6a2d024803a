"""On a GPU: every core-attention backend against megatron's unfused DotProductAttention, bf16.

Same q/k/v (GQA 8 query heads / 2 groups, head dim 64, sequence 512, batch 2) through
Transformer Engine's attention (megatron's ``TEDotProductAttention``), sfmed's flash-attn and
SDPA modules and megatron's unfused ``DotProductAttention``, forward and backward.

Tolerances: every bf16 result is compared with the unfused attention computed in fp32 (the
reference), and may be off by at most ``max(2 × e_unfused, 2e-2)`` (outputs) / ``max(2 ×
e_unfused, 5e-2)`` (gradients, relative to their max magnitude), where ``e_unfused`` is
megatron's own unfused attention's error in bf16. bf16 keeps 8 mantissa bits (ulp 2^-7 ≈ 0.008
at 1.0); fused kernels differ from the unfused path in accumulation order and in where they
round, which costs a few ulps, while a wrong mask, scale or head grouping costs O(1). Causality
is checked directly: changing keys/values after position t leaves outputs up to t unchanged.
"""

from __future__ import annotations

import pytest
import torch
from gpu.backends import attention_backends

pytestmark = pytest.mark.gpu

S, B, HEADS, GROUPS, D = 512, 2, 8, 2, 64
DEVICE = "cuda"


@pytest.fixture(scope="module")
def parallel_state():
    from sfmed.core.distributed import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1, device=DEVICE, seed=0)
    yield
    destroy_distributed()


def _config(dtype):
    from sfmed.models import ModelArch, transformer_config

    arch = ModelArch(
        num_layers=1, hidden_size=HEADS * D, ffn_hidden_size=4 * HEADS * D,
        num_attention_heads=HEADS, num_query_groups=GROUPS, vocab_size=256,
        max_position_embeddings=S, rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=False,
        kv_channels=D,
    )  # fmt: skip
    return transformer_config(arch, tp=1, pp=1, params_dtype=dtype, bf16=dtype == torch.bfloat16)


def _module(impl, attention, dtype):
    from megatron.core.transformer.enums import AttnMaskType

    cfg = _config(dtype)
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        cls = TEDotProductAttention
    else:
        from sfmed.models.specs import core_attention_module

        cls = core_attention_module(attention)
    return cls(cfg, 1, AttnMaskType.causal, "self").to(DEVICE)


def _run(module, qkv, dtype):
    from megatron.core.transformer.enums import AttnMaskType

    x = [t.detach().to(dtype).requires_grad_(True) for t in qkv]
    out = module(*x, None, attn_mask_type=AttnMaskType.causal)
    # a fixed random projection of the output as the loss: every output element matters
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (out.float() * w).sum().backward()
    return out.detach().float(), [t.grad.float() for t in x]


def _err(a, ref):
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


@pytest.mark.usefixtures("parallel_state")
@pytest.mark.parametrize("impl, attention", attention_backends())
def test_backend_matches_unfused_attention_in_bf16(impl, attention):
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(S, B, n, D, generator=g).to(DEVICE) for n in (HEADS, GROUPS, GROUPS)]
    ref_out, ref_grads = _run(_module("local", "unfused", torch.float32), qkv, torch.float32)
    uf_out, uf_grads = _run(_module("local", "unfused", torch.bfloat16), qkv, torch.bfloat16)
    out, grads = _run(_module(impl, attention, torch.bfloat16), qkv, torch.bfloat16)
    assert out.shape == ref_out.shape == (S, B, HEADS * D)
    e_out, e_uf = _err(out, ref_out), _err(uf_out, ref_out)
    assert e_out <= max(2 * e_uf, 2e-2), (e_out, e_uf)
    for name, a, u, r in zip("qkv", grads, uf_grads, ref_grads, strict=True):
        e, eu = _err(a, r), _err(u, r)
        assert e <= max(2 * eu, 5e-2), (name, e, eu)
    # causality: keys/values after position t do not change outputs up to t
    t = S // 2
    k2, v2 = qkv[1].clone(), qkv[2].clone()
    k2[t + 1 :] += 3.0
    v2[t + 1 :] -= 3.0
    out2, _ = _run(_module(impl, attention, torch.bfloat16), [qkv[0], k2, v2], torch.bfloat16)
    # (kernels may tile differently for other data: allow rounding, not a +-3 perturbation)
    assert (out2[: t + 1] - out[: t + 1]).abs().max().item() <= 1e-2
    assert (out2[t + 1 :] - out[t + 1 :]).abs().max().item() > 0.1
