"""torchrun worker (TP=2, CPU emulation): sequence log-probs from vocab-parallel logits against
the same computation on the full vocabulary, values and gradients. Prints RESULT on rank 0."""

import json

import torch

from sfmed.core.distributed import destroy_distributed, init_distributed
from sfmed.models import ModelArch, build_model, decoder_layer_spec, transformer_config
from sfmed.recipes.logprobs import reduce_token_logprobs, sequence_logprobs

V = 256
ARCH = ModelArch(
    num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=2,
    vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1e4,
    tie_word_embeddings=False, kv_channels=8,
)  # fmt: skip


def full_vocab_logps(full_logits, labels, mask, segments=None, nseg=None):
    """Independent reference: log_softmax over the whole vocabulary, gather, masked sums."""
    lp = torch.log_softmax(full_logits.double(), dim=-1)
    tok = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if segments is None:
        return (tok * (mask != 0)).sum(1)
    out = []
    for i in range(labels.shape[0]):
        row = []
        for j in range(nseg):
            sel = (mask[i] != 0) & (segments[i] == j)
            row.append(tok[i][sel].sum())
        out.append(torch.stack(row))
    return torch.stack(out)


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def same_on_all_ranks(t):
    other = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(other, t.contiguous())
    return all(torch.equal(o, other[0]) for o in other)


def synthetic_case(rank, tp):
    """Random full logits (same on every rank); each rank holds its vocab shard."""
    g = torch.Generator().manual_seed(0)
    b, s, v = 3, 9, 24
    full = torch.randn(b, s, v, generator=g, dtype=torch.float32) * 3
    labels = torch.randint(0, v, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.3).long()
    labels[mask == 0] = -100  # unused labels at dropped positions, HF style
    segments = torch.tensor([[0] * 4 + [1] * 5, [0] * 9, [0] * 3 + [1] * 3 + [-1] * 3])
    weights = torch.randn(b, generator=g, dtype=torch.float64)
    seg_weights = torch.randn(b, 2, generator=g, dtype=torch.float64)
    lo, hi = rank * v // tp, (rank + 1) * v // tp
    res = {}
    for name, layout in (("bsv", "bsv"), ("sbv", "sbv")):
        for segs in (None, segments):
            tag = name + ("_seg" if segs is not None else "")
            shard = full[..., lo:hi].clone().requires_grad_()
            x = shard if layout == "bsv" else shard.transpose(0, 1)
            # clone: megatron's kernel overwrites fp32 logits in place
            logps, counts = sequence_logprobs(
                x.clone(), labels, mask, segment_ids=segs, layout=layout
            )
            ref_full = full.double().clone().requires_grad_()
            ref = full_vocab_logps(ref_full, labels, mask, segs, 2)
            w = weights if segs is None else seg_weights
            (logps.double() * w).sum().backward()
            (ref * w).sum().backward()
            exp_counts = (
                (mask != 0).sum(1)
                if segs is None
                else torch.stack([((mask != 0) & (segs == j)).sum(1) for j in range(2)], 1)
            )
            res[tag] = {
                "shape": list(logps.shape),
                "value_diff": max_diff(logps, ref),
                "grad_diff": max_diff(shard.grad, ref_full.grad[..., lo:hi]),
                "grad_norm": ref_full.grad[..., lo:hi].norm().item(),
                "counts_equal": bool(torch.equal(counts, exp_counts)),
                "same_on_ranks": same_on_all_ranks(logps.detach()),
            }
    return res


def model_case(tp, sequence_parallel):
    """A real GPTModel at TP=2: its vocab-parallel logits -> our sums, against gathering the
    vocabulary and taking log_softmax; then gradients of every parameter shard."""
    from megatron.core import tensor_parallel

    # a wide init, so the logits are far from uniform and the test can tell tokens apart
    cfg = transformer_config(
        ARCH, tp=tp, pp=1, sequence_parallel=sequence_parallel, init_method_std=0.5
    )
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    spec = decoder_layer_spec(cfg, "local", "sdpa")  # sfmed's local spec supports SP
    model = build_model(ARCH, cfg, spec=spec, make_vocab_size_divisible_by=1)
    g = torch.Generator().manual_seed(1)
    b, s = 2, 16
    tokens = torch.randint(0, V, (b, s), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.zeros(b, s, dtype=torch.long)
    mask[0, 5:12] = 1
    mask[1, 3:15] = 1
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    w = torch.tensor([0.7, -1.3])

    def grads():
        gs = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return gs

    logits = model(tokens, pos, None)
    shape = list(logits.shape)
    ours, counts = sequence_logprobs(logits, labels, mask)
    (ours * w).sum().backward()
    g_ours = grads()

    full = tensor_parallel.gather_from_tensor_model_parallel_region(model(tokens, pos, None))
    lp = torch.log_softmax(full.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ref = (lp * mask).sum(1)
    (ref * w).sum().backward()
    g_ref = grads()

    with torch.no_grad():  # GPTModel with labels returns per-token CE [b, s]: log p = -CE
        ce = model(tokens, pos, None, labels=labels)
    via_ce, _ = reduce_token_logprobs(-ce, mask)
    return {
        "logits_shape": shape,
        "ce_shape": list(ce.shape),
        "value_diff": max_diff(ours, ref),
        "via_labels_diff": max_diff(via_ce, ref),
        "grad_diff": max(max_diff(a, c) for a, c in zip(g_ours, g_ref)),
        "grad_scale": max(c.abs().max().item() for c in g_ref),
        "counts": counts.tolist(),
        "values": ours.tolist(),
        "uniform": (counts * -torch.log(torch.tensor(float(V)))).tolist(),
        "same_on_ranks": same_on_all_ranks(ours.detach()),
    }


def main():
    tp = 2
    info = init_distributed(tp=tp, pp=1, device="cpu", seed=0)
    res = {
        "synthetic": synthetic_case(info.rank, tp),
        "model": model_case(tp, sequence_parallel=False),
    }
    if info.rank == 0:
        print("RESULT " + json.dumps(res))
    destroy_distributed()


if __name__ == "__main__":
    main()
