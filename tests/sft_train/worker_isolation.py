"""torchrun worker: packed SFT batches against the same conversations run one by one.

    torchrun --nproc_per_node 4 worker_isolation.py <dataset prefix> <conversations.npz> tp2pp2
    torchrun --nproc_per_node 3 worker_isolation.py <dataset prefix> <conversations.npz> pp3

Runs megatron-core's real pipeline schedules (CPU emulation, fp32, no DDP so gradients stay the
plain gradients of the summed loss) with the SFT recipe's forward step on the packed samples
(read through ``SFTSamples``), and a plain causal forward step on each conversation alone
(positions 0..n-1, no packing). Prints ``RESULT <json>`` on rank 0.
"""

from __future__ import annotations

import json
import sys
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from sfmed.core.distributed import init_distributed
from sfmed.models import ModelArch, build_model, transformer_config

ARCH = ModelArch(
    num_layers=6, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=2,
    vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1e4,
    tie_word_embeddings=False, kv_channels=8,
)  # fmt: skip
SEQ = 64


def setup(tp: int, pp: int):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(tp=tp, pp=pp, device="cpu", seed=7)
    cfg = transformer_config(ARCH, tp=tp, pp=pp, calculate_per_token_loss=True)
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_model(
        ARCH,
        cfg,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        make_vocab_size_divisible_by=1,
    )
    return model


def _sum_loss(mask, output_tensor):
    losses = output_tensor.float().reshape(-1)
    m = mask.float().reshape(-1)
    total = (losses * m).sum()
    return total, m.sum().to(torch.int), {"sum": torch.stack([total.detach(), m.sum()])}


def plain_step(data_iterator, model):
    """One conversation, unpacked: causal attention over it alone, positions from 0."""
    from megatron.core.utils import get_attr_wrapped_model

    b = next(data_iterator)
    pre = get_attr_wrapped_model(model, "pre_process")
    post = get_attr_wrapped_model(model, "post_process")
    out = model(
        b["tokens"] if pre else None,
        b["position_ids"] if pre else None,
        None,
        labels=b["labels"] if post else None,
    )
    return out, (partial(_sum_loss, b["loss_mask"]) if post else None)


def leaky_step(inner):
    """The recipe's step, except that middle stages lose the pack boundaries (the known bug)."""
    from megatron.core.utils import get_attr_wrapped_model

    def step(data_iterator, model):
        pre = get_attr_wrapped_model(model, "pre_process")
        post = get_attr_wrapped_model(model, "post_process")
        if pre or post:
            return inner(data_iterator, model)
        next(data_iterator)
        return model(None, None, None), None

    return step


def run(model, step, batches, seq_length, mbs, grads=True):
    """Loss sum and count over ``batches`` (one schedule call), and the grads of the sum."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad(set_to_none=True)
    out = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=not grads,
    )
    from megatron.core import parallel_state as ps

    t = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage() and out:
        # the plain step reports "sum"; the recipe's loss function "lm loss" = [sum, count]
        t += torch.stack([o.get("sum", o.get("lm loss")).double() for o in out]).sum(0)
        if ps.get_tensor_model_parallel_rank() != 0:
            t.zero_()
    dist.all_reduce(t)
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return t.tolist(), g


def conversation_batches(convs):
    """Each conversation alone as a [1, n] batch: labels/mask shifted within it, last predicts
    nothing (computed here from the raw arrays, independently of the dataset reader)."""
    out = []
    for ids, target in convs:
        n = len(ids)
        labels = np.zeros(n, np.int64)
        labels[:-1] = ids[1:]
        mask = np.zeros(n, np.float32)
        mask[:-1] = target[1:]
        out.append(
            {
                "tokens": torch.tensor(ids, dtype=torch.long)[None],
                "labels": torch.tensor(labels)[None],
                "loss_mask": torch.tensor(mask)[None],
                "position_ids": torch.arange(n)[None],
            }
        )
    return out


def packed_batches(prefix, mbs):
    from sfmed.data.chat.store import SFTDataset
    from sfmed.recipes.sft import SFTData, SFTSamples

    n = len(SFTDataset(prefix))
    data = SFTData([prefix], [1.0], SEQ, 0, [n])
    # the samples in storage order (the test checks the blend order elsewhere)
    ds = SFTSamples(data, [np.arange(n)], n, seed=0)
    ds._order = lambda k, epoch: np.arange(n)
    items = [ds[i] for i in range(n)]
    batches = []
    for i in range(0, n, mbs):
        group = items[i : i + mbs]
        batches.append({k: torch.from_numpy(np.stack([g[k] for g in group])) for k in group[0]})
    return batches


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def grad_rel(ga, gb):
    """max over parameters of |ga - gb| / |gb| (Frobenius norms), on this rank; max over ranks."""
    worst = 0.0
    for n in gb:
        worst = max(worst, float((ga[n] - gb[n]).norm() / gb[n].norm().clamp_min(1e-30)))
    t = torch.tensor([worst], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def main(prefix, conv_file, mode):
    from sfmed.recipes.sft import make_forward_step

    z = np.load(conv_file)
    convs = [(z[f"ids{i}"], z[f"mask{i}"]) for i in range(int(z["n"]))]
    res = {}
    step = make_forward_step(torch.device("cpu"))
    if mode == "tp2pp2":
        model = setup(2, 2)
        singles = conversation_batches(convs)
        ref = [0.0, 0.0]
        for b in singles:
            s, _ = run(model, plain_step, [b], b["tokens"].shape[1], 1, grads=False)
            ref = [ref[0] + s[0], ref[1] + s[1]]
        p1, g1 = run(model, step, packed_batches(prefix, 1), SEQ, 1)
        p2, g2 = run(model, step, packed_batches(prefix, 2), 2 * SEQ, 1)
        res["packed_vs_single"] = {"packed": p1, "single": ref, "rel": rel(p1[0], ref[0])}
        res["mbs"] = {
            "mbs1": p1,
            "mbs2": p2,
            "rel": rel(p2[0], p1[0]),
            "grad_rel": grad_rel(g2, g1),
        }
    elif mode == "pp3":
        model = setup(1, 3)
        singles = conversation_batches(convs)
        ref, gref = [0.0, 0.0], None
        for b in singles:
            s, g = run(model, plain_step, [b], b["tokens"].shape[1], 1)
            ref = [ref[0] + s[0], ref[1] + s[1]]
            gref = g if gref is None else {n: gref[n] + g[n] for n in gref}
        packs = packed_batches(prefix, 1)
        p, g = run(model, step, packs, SEQ, 1)
        leak, _ = run(model, leaky_step(step), packs, SEQ, 1, grads=False)
        res["packed_vs_single"] = {
            "packed": p, "single": ref, "rel": rel(p[0], ref[0]), "grad_rel": grad_rel(g, gref),
            "leak_rel": rel(leak[0], ref[0]),
        }  # fmt: skip
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(res), flush=True)
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
