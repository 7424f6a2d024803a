"""torchrun worker: train a tiny GPTModel with real megatron-core DDP + distributed optimizer
under the CPU emulation, then save and reload a dist checkpoint. Prints JSON results on rank 0."""

import json
import os
import sys
from functools import partial

import torch

from sfmed.core.distributed import destroy_distributed, init_distributed
from sfmed.models import ModelArch, build_model, transformer_config


def main():
    tp, pp, steps, ckpt = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    info = init_distributed(tp=tp, pp=pp, device="cpu", seed=1234)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    arch = ModelArch(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=8,
        num_query_groups=2,
        vocab_size=300,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        kv_channels=8,
    )
    cfg = transformer_config(arch, tp=tp, pp=pp)
    model = build_model(
        arch,
        cfg,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
    )
    model = DistributedDataParallel(config=cfg, ddp_config=ddp_cfg, module=model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, use_distributed_optimizer=True, clip_grad=1.0),
        [model],
    )
    seq, mbs, nmb = 32, 2, 2
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 300, (1, 8), generator=g)
    data = base.repeat(mbs, seq // 8 + 1)[:, : seq + 1]

    def batch_iter():
        while True:
            yield {"tokens": data[:, :-1], "labels": data[:, 1:]}

    def loss_func(mask, out):
        loss = (out.float() * mask).sum() / mask.sum()
        return loss, {"loss": loss.detach()}

    def forward_step(it, m):
        b = next(it)
        pos = torch.arange(seq).unsqueeze(0).expand(mbs, -1)
        out = m(b["tokens"], pos, None, labels=b["labels"])
        return out, partial(loss_func, torch.ones(mbs, seq))

    fb = get_forward_backward_func()
    losses = []
    it = batch_iter()
    for _ in range(steps):
        model.zero_grad_buffer()
        opt.zero_grad()
        res = fb(
            forward_step_func=forward_step,
            data_iterator=it,
            model=[model],
            num_microbatches=nmb,
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=False,
        )
        ok, gn, _ = opt.step()
        if parallel_state.is_pipeline_last_stage():
            loss = torch.stack([r["loss"] for r in res]).mean()
        else:
            loss = torch.zeros(())
        torch.distributed.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
        losses.append(float(loss))
    os.makedirs(ckpt, exist_ok=True)
    sd = model.module.sharded_state_dict()
    dist_checkpointing.save(sd, ckpt)
    loaded = dist_checkpointing.load(model.module.sharded_state_dict(), ckpt)
    same = all(
        torch.equal(loaded[k], v)
        for k, v in model.module.state_dict().items()
        if k in loaded and torch.is_tensor(loaded[k])
    )
    if info.rank == 0:
        print("RESULT " + json.dumps({"losses": losses, "reload_equal": same}))
    destroy_distributed()


if __name__ == "__main__":
    main()
