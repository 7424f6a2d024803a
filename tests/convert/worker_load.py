"""torchrun worker (4 processes, TP=2 x PP=2, gloo, CPU emulation): real megatron-core loads sfmed
conversions and saves checkpoints of its own for the way back.

argv[1]: a JSON spec::

    {"tokens": "tokens.pt",
     "logits": [{"ckpt": DIR, "out": "logits.pt", "resave": DIR or null,
                 "tokens": "other_tokens.pt" (optional)}, ...],
     "vpp": {"ckpt": DIR, "root": DIR}}

- each ``logits`` job: build GPTModel from the checkpoint's sfmed.json, load it with
  ``sfmed.convert.load_mcore_weights`` (megatron's dist_checkpointing.load), save the logits of
  ``tokens``; with ``resave``, also save the loaded model with megatron's own
  ``dist_checkpointing.save`` (to compare layouts and to convert back a megatron-written file);
- ``vpp``: load the checkpoint into two virtual-pipeline chunks per stage and save them the way
  Megatron-LM saves a trained run (``model0``/``model1``, an optimizer entry, ``iter_0000100``).
"""

import dataclasses
import json
import os
import sys

import torch


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    from sfmed.core.distributed import destroy_distributed, init_distributed

    info = init_distributed(tp=2, pp=2, device="cpu")
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from sfmed.convert import checkpoint_arch, load_mcore_weights
    from sfmed.convert.verify import build_and_load, forward_logits
    from sfmed.core.megatron_layout import write_tracker
    from sfmed.models import build_model, transformer_config

    for job in spec["logits"]:
        tokens = torch.load(job.get("tokens") or spec["tokens"], weights_only=True)
        model, arch = build_and_load(job["ckpt"], torch.float32, "cpu")
        logits = forward_logits(model, arch.vocab_size, tokens, "cpu")
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
            torch.save(logits, job["out"])
        if job.get("resave"):
            if info.rank == 0:
                os.makedirs(job["resave"])
            torch.distributed.barrier()
            state = {"model": model.sharded_state_dict(), "checkpoint_version": 3.0}
            dist_checkpointing.save({**state, "iteration": 0}, job["resave"])

    vpp = spec["vpp"]
    arch, padded = checkpoint_arch(vpp["ckpt"])
    config = transformer_config(arch, tp=2, pp=2, virtual_pipeline_model_parallel_size=2)
    ps.set_virtual_pipeline_model_parallel_world_size(2)
    pp_rank, last = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_pipeline_model_parallel_world_size(),
    )
    chunks = [
        build_model(
            arch,
            config,
            pre_process=pp_rank == 0 and v == 0,
            post_process=pp_rank == last - 1 and v == 1,
            vp_stage=v,
            padded_vocab_size=padded,
        )
        for v in range(2)
    ]
    load_mcore_weights(chunks, vpp["ckpt"])
    state = {f"model{v}": c.sharded_state_dict() for v, c in enumerate(chunks)}
    # An optimizer-like entry, as a trained checkpoint has: the export must ignore it.
    state["optimizer"] = {
        f"{top}.{k}": dataclasses.replace(
            sh, key="optimizer.state.exp_avg." + sh.key, data=torch.full_like(sh.data, 7.0)
        )
        for top in ("model0", "model1")
        for k, sh in state[top].items()
        if isinstance(sh, ShardedTensor)
    }
    layer_keys = sorted(
        {
            f"{sh.key}@{sh.global_offset[0]}"
            for c in state.values()
            for sh in c.values()
            if isinstance(sh, ShardedTensor) and sh.key.endswith("linear_proj.weight")
        }
    )
    it_dir = os.path.join(vpp["root"], "iter_0000100")
    if info.rank == 0:
        os.makedirs(it_dir)
    torch.distributed.barrier()
    dist_checkpointing.save({**state, "iteration": 100, "checkpoint_version": 3.0}, it_dir)
    if info.rank == 0:
        write_tracker(vpp["root"], 100)
        print("RESULT " + json.dumps({"vpp_layer_keys": layer_keys}))
    destroy_distributed()


if __name__ == "__main__":
    main()
