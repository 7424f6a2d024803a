"""torchrun worker (4 processes, gloo, CPU emulation): logits of converted checkpoints of several
model families and parallel layouts in one launch.

argv[1]: a JSON list of jobs ``{"ckpt": DIR, "tokens": FILE, "out": FILE, "tp": T, "pp": P}``;
jobs are grouped by layout, megatron's parallel state is rebuilt between layouts, and TP rank 0
of the last stage saves the full-vocabulary fp32 logits of each job.
"""

import json
import sys

import torch


def main():
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    from megatron.core import parallel_state as ps

    from sfmed.convert.verify import build_and_load, forward_logits
    from sfmed.core.distributed import destroy_distributed, init_distributed

    layouts = sorted({(j["tp"], j["pp"]) for j in jobs})
    for tp, pp in layouts:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        init_distributed(tp=tp, pp=pp, device="cpu")
        for job in (j for j in jobs if (j["tp"], j["pp"]) == (tp, pp)):
            tokens = torch.load(job["tokens"], weights_only=True)
            model, arch = build_and_load(job["ckpt"], torch.float32, "cpu")
            logits = forward_logits(model, arch.vocab_size, tokens, "cpu")
            if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
                torch.save(logits, job["out"])
            del model
    destroy_distributed()


if __name__ == "__main__":
    main()
