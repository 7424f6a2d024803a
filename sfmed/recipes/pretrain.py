"""Pretraining recipe: the forward step and the next-token loss (pure tensor code).

megatron-core's pipeline schedules call ``forward_step(data_iterator, model_chunk)`` once per
micro-batch and chunk; the returned loss function runs on the last pipeline stage. The loss is
returned as (sum over tokens, token count) and the schedule runs with
``calculate_per_token_loss=True``, so gradients are the mean over every token of the global
batch — independent of how it is cut into micro-batches and data-parallel ranks.
"""

from __future__ import annotations

from functools import partial

import torch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(summed masked loss, token count, {'lm loss': [sum, count]}) for the schedule."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.float()])
    return loss, num_tokens, {"lm loss": report}


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_forward_step(device: torch.device):
    """``forward_step(data_iterator, model)`` for megatron's schedules on ``device``."""
    from megatron.core.utils import get_attr_wrapped_model

    from sfmed.core.mcore_compat import get_batch_on_this_cp_rank

    def forward_step(data_iterator, model):
        pre = get_attr_wrapped_model(model, "pre_process")
        post = get_attr_wrapped_model(model, "post_process")
        if not (pre or post):
            # A middle stage: its input arrives from the previous stage via set_input_tensor.
            return model(None, None, None), None
        # With context parallelism each CP rank keeps its (load-balanced) part of the sequence;
        # a no-op at cp=1.
        batch = get_batch_on_this_cp_rank(_to(next(data_iterator), device))
        out = model(
            batch["tokens"] if pre else None,
            batch["position_ids"] if pre else None,
            None,  # causal: the attention kernels build the mask
            labels=batch["labels"] if post else None,
        )
        return out, (partial(loss_func, batch["loss_mask"]) if post else None)

    return forward_step
