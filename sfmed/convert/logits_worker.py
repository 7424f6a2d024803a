"""torchrun worker of :func:`sfmed.convert.verify.run_mcore_logits`: load a Megatron checkpoint
into GPTModel at tp×pp and save the logits for the given tokens (from the last pipeline stage).

``python -m torch.distributed.run --nproc_per_node N -m sfmed.convert.logits_worker
--ckpt DIR --tokens tokens.pt --out logits.pt --tp T --pp P [--device cpu] [--dtype float32]``
"""

from __future__ import annotations

import argparse
import logging

import torch


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, initialise the process groups, compute and save the logits."""
    from sfmed.convert.verify import mcore_logits
    from sfmed.core.distributed import destroy_distributed, init_distributed
    from sfmed.core.dtypes import FLOAT_DTYPES, torch_dtype
    from sfmed.core.logging import setup_logging

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=sorted(FLOAT_DTYPES))
    ap.add_argument("--impl", default="local", choices=["local", "transformer_engine"])
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "flash", "unfused"])
    args = ap.parse_args(argv)
    setup_logging(logging.WARNING)

    init_distributed(tp=args.tp, pp=args.pp, device=args.device)
    from megatron.core import parallel_state as ps

    tokens = torch.load(args.tokens, weights_only=True)
    logits = mcore_logits(
        args.ckpt, tokens, torch_dtype(args.dtype), args.device, args.impl, args.attention
    )
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(logits, args.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
