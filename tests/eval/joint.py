"""An independent reference for log-likelihood scoring: one forward pass over the whole text.

The continuation's tokens are found from the tokenizer's character offsets (every token that
covers a character of the continuation), not from token counts as the backends do.
"""

from __future__ import annotations

import torch


def joint_loglik(model, tok, context: str, continuation: str, add_special_tokens: bool) -> float:
    """Sum of log P(token) over the tokens of ``context + continuation`` that cover a character
    of ``continuation``, from a single forward pass over the full text."""
    enc = tok(
        context + continuation,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
    )
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    start = len(context.rstrip())  # trailing spaces of the context belong to the answer
    first = next(
        i for i, (a, b) in enumerate(offsets) if b > start and b > a
    )  # first token ending inside the continuation
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return sum(float(lp[i - 1, ids[i]]) for i in range(first, len(ids)))
