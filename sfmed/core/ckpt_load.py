"""Load a Megatron checkpoint's model weights into GPTModel chunks (any TP/PP/VPP).

This is megatron-core's own ``dist_checkpointing.load`` with checks in front that turn a
mismatch into a message naming the numbers ("checkpoint hidden_size 64 vs model 128") instead of
a shape assertion deep inside torch.distributed.checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sfmed.core import megatron_layout as layout
from sfmed.core.errors import CheckpointMismatchError
from sfmed.core.torch_dist import TorchDistReader

log = logging.getLogger(__name__)


def model_key(i: int, n: int) -> str:
    """Megatron-LM's top-level key of model chunk ``i`` of ``n`` (``model``, or ``model0``...)."""
    return "model" if n == 1 else f"model{i}"


def unwrap_model(m):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(m, "module"):  # DDP / Float16Module wrappers
        m = m.module
    return m


def _model_facts(chunk) -> dict:
    c = chunk.config
    return {
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.ffn_hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": c.num_query_groups or c.num_attention_heads,
        "kv_channels": c.kv_channels,
        "padded_vocab_size": chunk.vocab_size,
        "tie_word_embeddings": chunk.share_embeddings_and_output_weights,
    }


def check_model_matches(chunk, meta: dict, where: Path) -> None:
    """Raise :class:`CheckpointMismatchError` when ``chunk``'s shape differs from sfmed.json's."""
    arch = meta.get("arch") or {}
    ckpt = {**arch, "padded_vocab_size": meta.get("padded_vocab_size")}
    diffs = [
        f"checkpoint {k} {ckpt[k]} vs model {v}"
        for k, v in _model_facts(chunk).items()
        if ckpt.get(k) is not None and ckpt[k] != v
    ]
    if diffs:
        fix = (
            " (build the model with padded_vocab_size=sfmed.json's padded_vocab_size, e.g. via "
            "sfmed.convert.checkpoint_arch)"
            if any(d.startswith("checkpoint padded_vocab_size") for d in diffs)
            else ""
        )
        raise CheckpointMismatchError(f"{where} does not fit the model: " + "; ".join(diffs) + fix)


def _check_shapes(request: dict, reader: TorchDistReader, where: Path) -> set[str]:
    """Compare every requested ShardedTensor's global shape with the stored one; return the
    tensor keys the request reads."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    keys: set[str] = set()
    for v in nested_values(request):
        if isinstance(v, ShardedTensorFactory):
            keys.add(v.key)  # fc1's SwiGLU factory: megatron checks the halves it builds
            continue
        if not isinstance(v, ShardedTensor):
            continue
        keys.add(v.key)
        if not reader.has(v.key):
            raise CheckpointMismatchError(
                f"{where} lacks {v.key}, which the model needs (is it a checkpoint of another "
                "model type, or untied vs tied embeddings?)"
            )
        got = reader.shape(v.key)
        if got != tuple(v.global_shape):
            raise CheckpointMismatchError(
                f"{where}: {v.key} is stored as {list(got)} but the model expects "
                f"{list(v.global_shape)}; build the model from the checkpoint's sfmed.json"
            )
    return keys


def _drop_missing_extra_state(request: dict, reader: TorchDistReader) -> dict[str, list[str]]:
    """Remove ``_extra_state`` ShardedObjects the checkpoint does not hold; return their keys.

    Transformer Engine layers checkpoint FP8 metadata there, megatron's local layers nothing;
    a checkpoint written for one spec then lacks objects the other asks for. They carry no
    weights, so they are skipped (and set to None on load) instead of failing.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    dropped: dict[str, list[str]] = {}
    for top, sd in request.items():  # GPTModel.sharded_state_dict() is flat
        for k in list(sd):
            v = sd[k]
            if (
                isinstance(v, ShardedObject)
                and v.key.endswith("._extra_state")
                and not reader.has(v.unique_key)
            ):
                del sd[k]
                dropped.setdefault(top, []).append(k)
    return dropped


def load_mcore_weights(model_chunks, ckpt_dir: str | Path, *, strict: bool = True) -> None:
    """Load the model weights of a torch_dist checkpoint into ``model_chunks`` in place.

    ``model_chunks``: this rank's GPTModel, or the list of its virtual-pipeline chunks (wrappers
    with ``.module`` are unwrapped). ``ckpt_dir``: a checkpoint root (tracker file) or an
    ``iter_*``/``release`` folder, converted or trained, saved at any TP/PP. Checks the
    architecture against ``sfmed.json`` and every tensor's global shape first, raising
    :class:`CheckpointMismatchError` naming the mismatch. Must run on every rank of the model's
    process groups (it is a collective like ``dist_checkpointing.load``).
    """
    from megatron.core import dist_checkpointing

    ckpt = layout.resolve_checkpoint(ckpt_dir)
    chunks = [
        unwrap_model(m)
        for m in (model_chunks if isinstance(model_chunks, list | tuple) else [model_chunks])
    ]
    reader = TorchDistReader(ckpt)
    meta = layout.read_meta(ckpt)
    check_model_matches(chunks[0], meta, ckpt)
    request = {model_key(i, len(chunks)): c.sharded_state_dict() for i, c in enumerate(chunks)}
    keys = _check_shapes(request, reader, ckpt)
    reader.check_files(sorted(k for k in keys if reader.has(k)))
    dropped = _drop_missing_extra_state(request, reader)
    if dropped:
        n = sum(len(v) for v in dropped.values())
        log.info("checkpoint holds no %d _extra_state object(s) of this layer spec", n)
    loaded = dist_checkpointing.load(request, str(ckpt))
    for i, c in enumerate(chunks):
        top = model_key(i, len(chunks))
        sd = loaded[top]
        sd.update(dict.fromkeys(dropped.get(top, ())))
        c.load_state_dict(sd, strict=strict)
    log.info("loaded model weights from %s", ckpt)
