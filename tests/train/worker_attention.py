"""torchrun worker (TP=2): sfmed's SDPA/flash core attention against megatron's DotProductAttention,
alone and inside a full GPTModel, with and without sequence parallelism. Prints RESULT on rank 0."""

import json

import torch

from sfmed.core.distributed import destroy_distributed, init_distributed
from sfmed.models import ModelArch, build_model, decoder_layer_spec, transformer_config

ARCH = ModelArch(
    num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=2,
    vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e4,
    tie_word_embeddings=False, kv_channels=8,
)  # fmt: skip


def core_attention_case(cfg):
    """Same q/k/v (GQA 4 heads / 1 group per TP rank) through both modules: outputs and grads."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from sfmed.models.attention import SDPAttention

    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    sdpa = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(torch.distributed.get_rank())
    s, b = 24, 3
    qkv = [torch.randn(s, b, n, 8, generator=g, requires_grad=True) for n in (4, 1, 1)]
    out_ref, out = ref(*qkv, None), sdpa(*qkv, None)
    g_ref = torch.autograd.grad(out_ref.square().sum(), qkv)
    g_out = torch.autograd.grad(out.square().sum(), qkv)
    # causality: the first position's output must not depend on later keys/values
    k2 = qkv[1].detach().clone()
    k2[5:] += 1.0
    causal_ok = torch.equal(sdpa(qkv[0], k2, qkv[2], None)[0], out[0])
    return {
        "shape": list(out.shape),
        "max_diff": (out - out_ref).abs().max().item(),
        "max_grad_diff": max((a - c).abs().max().item() for a, c in zip(g_ref, g_out)),
        "causal": bool(causal_ok),
    }


def model_logits(attention, sp, tokens):
    cfg = transformer_config(ARCH, tp=2, pp=1, sequence_parallel=sp)
    torch.manual_seed(0)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_model(
        ARCH, cfg, spec=decoder_layer_spec(cfg, "local", attention), make_vocab_size_divisible_by=1
    )
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, pos, None)
    loss = logits.float().logsumexp(-1).mean()  # backward through the whole model
    loss.backward()
    from megatron.core import parallel_state as ps

    for p in model.parameters():
        if getattr(p, "sequence_parallel", False):
            # What finalize_model_grads does: each TP rank saw part of the sequence.
            torch.distributed.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    norm_marked = all(
        getattr(p, "sequence_parallel", False) == sp
        for n, p in model.named_parameters()
        if "layernorm" in n or n.endswith("final_layernorm.weight")
    )
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach(), grads, norm_marked


def main():
    info = init_distributed(tp=2, pp=1, device="cpu", seed=0)
    cfg = transformer_config(ARCH, tp=2, pp=1)
    res = {"core": core_attention_case(cfg)}
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    ref, ref_g, _ = model_logits("unfused", False, tokens)
    for name, attention, sp in (("sdpa", "sdpa", False), ("sdpa_sp", "sdpa", True)):
        logits, grads, marked = model_logits(attention, sp, tokens)
        res[name] = {
            "max_diff": (logits - ref).abs().max().item(),
            "max_grad_diff": (grads - ref_g).abs().max().item(),
            "norms_marked": marked,
        }
    if info.rank == 0:
        print("RESULT " + json.dumps(res))
    destroy_distributed()


if __name__ == "__main__":
    main()
