"""DPO (and IPO, hinge, rDPO, RPO) on megatron-core: pairs in one pack, vocab-parallel log-probs.

Data: preference datasets written by ``launch/preprocess.py format=preference``
(:class:`~sfmed.data.chat.store.PreferenceDataset`): a sample is one pair (chosen, then
rejected) or, packed, several whole pairs, so the two sides of a pair are always in the same
micro-batch and the same THD pack. Sampling, blending, splitting and padding are SFT's
(:mod:`sfmed.recipes.sft`), and so is the forward step's isolation: each micro-batch runs as
one THD pack whose ``cu_seqlens`` start at every side of every pair (block-diagonal attention,
RoPE restarting per side). The sample length is ``chat.seq_length`` for packed data and twice
that for unpacked data (a pair's two sides, each up to ``chat.seq_length``).

Log-probs: the last pipeline stage asks ``GPTModel`` for the per-token cross-entropy of the
labels, which megatron-core computes from the vocab-parallel logits (no rank ever holds the full
vocabulary), and sums ``-CE`` over each side's answer tokens
(:func:`sfmed.recipes.logprobs.reduce_token_logprobs`).

Reference: the frozen reference model (``reference.checkpoint``, default ``init_from``) scores
the same micro-batches in the **same layout** (TP/PP/DP, packing, micro-batch cut) in a
forward-only pass of megatron-core's schedule, either

* ``precompute`` (default): once, over every sample of the run, before the first step; the
  values are all-reduced to every rank and stored beside the run in
  ``<ckpt_dir>/reference_logps/<split>.npy`` with a sidecar naming the key (data, sample count,
  layout, reference checkpoint). A run whose key matches reuses them (resume); any mismatch
  recomputes them. The reference weights are freed afterwards; or
* ``on_the_fly``: a second frozen model in memory scores each step's micro-batches just before
  the policy's pass (:meth:`DPORecipe.prepare_step`).

Loss: :func:`sfmed.recipes.dpo_loss.dpo_loss`; each micro-batch returns the sum of its pairs'
losses and its number of pairs, and the schedule runs with ``calculate_per_token_loss``, so the
loss and gradients are the mean over the pairs of the **global** batch for any micro-batch/DP
cut. RPO's NLL term is averaged over the chosen tokens of the global batch (each item carries
its global batch's totals), which keeps that invariance too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from sfmed.config.dpo import DPOConfig
from sfmed.core.errors import ConfigError
from sfmed.recipes.base import Recipe, StepReport
from sfmed.recipes.sft import (
    SFTData,
    SFTSamples,
    _entries,
    _read_meta,
    check_packed_run,
    packed_seq_params,
    resolve_data,
    split_parts,
)

log = logging.getLogger(__name__)

KIND = "preference"
REF_DIR = "reference_logps"
# Width-10 report of a micro-batch's pairs: sums, turned into means by summarize().
DPO_REPORT = (
    "loss",
    "pairs",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "nll",
    "chosen_tokens",
)


# -- data ------------------------------------------------------------------------------------------


@dataclass
class DPOData(SFTData):
    """The resolved preference data (``seq_length`` is the sample length) and the most pairs
    any sample holds."""

    max_pairs: int = 1
    reference: Path | None = None
    """The reference checkpoint's iteration folder (None with ``dpo.reference_free``)."""


def _packed(meta: dict) -> bool:
    return bool(((meta.get("stats") or {}).get("packing") or {}).get("packed"))


def _max_sample(prefix: str) -> tuple[int, int]:
    """(longest sample in tokens, most pairs in a sample) of a preference dataset."""
    from sfmed.data.chat.store import PreferenceDataset

    ds = PreferenceDataset(prefix)
    lengths = ds.sample_lengths
    seqs = np.diff(ds._ids.doc_idx)
    return (int(lengths.max()) if len(lengths) else 0, int(seqs.max()) // 2 if len(seqs) else 0)


def sample_length(cfg: DPOConfig) -> int:
    """Tokens per training sample: ``data.seq_length``, else ``chat.seq_length`` of packed data
    and twice it for unpacked data (both sides of a pair)."""
    if cfg.data.seq_length is not None:
        return int(cfg.data.seq_length)
    lengths = set()
    for p, _, k in _entries(cfg, KIND):
        m = _read_meta(p, k, KIND)
        lengths.add(int(m["seq_length"]) * (1 if _packed(m) else 2))
    return max(lengths)


class PreferenceSamples(SFTSamples):
    """:class:`~sfmed.recipes.sft.SFTSamples` of pairs. Items add ``segment`` (``[L]``: the side
    each token belongs to, ``2k`` = chosen of pair ``k``, ``2k+1`` = its rejected, -1 = padding),
    ``pairs`` (pairs in the sample), ``ref`` (``[max_pairs, 2]`` reference log-probs of each pair's
    chosen/rejected side, once known) and ``batch_chosen`` (chosen tokens and pairs of the global
    batch the sample belongs to: RPO's per-token normaliser)."""

    dataset_class = "PreferenceDataset"

    def __init__(
        self, data: DPOData, parts, size: int, seed: int, global_batch: int, totals: bool = True
    ):
        super().__init__(data, parts, size, seed)
        self.global_batch = global_batch
        self.totals = totals
        """Whether items carry ``batch_chosen`` (RPO needs it; it costs a read of the batch)."""
        self.ref_table: np.ndarray | None = None
        """``[size, max_pairs, 2]`` reference log-probs (precompute mode), set before loading."""
        self._batch_stats: dict[int, np.ndarray] = {}

    @staticmethod
    def _chosen_tokens(raw: dict[str, np.ndarray]) -> tuple[float, float]:
        lens = raw["seq_lengths"]
        side = np.repeat(np.arange(len(lens)), lens)
        return float(raw["loss_mask"][side % 2 == 0].sum()), float(len(lens) // 2)

    def batch_totals(self, i: int) -> np.ndarray:
        """(chosen tokens, pairs) summed over the global batch of sample ``i``."""
        g = i // self.global_batch
        if g not in self._batch_stats:
            lo, hi = g * self.global_batch, min((g + 1) * self.global_batch, self.size)
            tot = np.sum([self._chosen_tokens(self.raw(j)) for j in range(lo, hi)], axis=0)
            self._batch_stats = {g: np.asarray(tot, np.float64)}
        return self._batch_stats[g]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        raw = self.raw(i)
        item = self.padded(raw)
        lens = raw["seq_lengths"]
        if len(lens) % 2:
            raise ValueError(f"sample {i} holds {len(lens)} sequences; pairs come in twos")
        seg = np.full(self.data.seq_length, -1, np.int64)
        seg[: int(lens.sum())] = np.repeat(np.arange(len(lens)), lens)
        ref = np.zeros((self.data.max_pairs, 2), np.float64)
        if self.ref_table is not None:
            ref = self.ref_table[i]
        item.update(
            segment=seg,
            pairs=np.int64(len(lens) // 2),
            ref=ref,
            sample=np.int64(i),
            batch_chosen=self.batch_totals(i) if self.totals else np.zeros(2),
        )
        return item


# -- loss and forward steps (tensor code) ----------------------------------------------------------


def _side_sums(token_logps: torch.Tensor, batch: dict, max_pairs: int):
    """``[mbs, 2 * max_pairs]`` sums and counts over each side's answer tokens (side ``2k``:
    chosen of pair ``k``, ``2k + 1``: its rejected)."""
    from sfmed.recipes.logprobs import reduce_token_logprobs

    return reduce_token_logprobs(
        token_logps, batch["loss_mask"], batch["segment"], num_segments=2 * max_pairs
    )


def pair_logprobs(token_logps: torch.Tensor, batch: dict, max_pairs: int):
    """Per-pair sums of ``token_logps`` (``[mbs, L]``) over each side's answer tokens.

    Returns ``(chosen, rejected, chosen_tokens, rejected_tokens)``, each ``[n_pairs]`` in
    sample order (padding pairs of a micro-batch dropped), and the ``[mbs, max_pairs]`` mask of
    the real pairs."""
    logps, counts = _side_sums(token_logps, batch, max_pairs)
    real = torch.arange(max_pairs, device=logps.device)[None, :] < batch["pairs"][:, None]
    return (
        logps[:, 0::2][real],
        logps[:, 1::2][real],
        counts[:, 0::2][real],
        counts[:, 1::2][real],
        real,
    )


def _token_logps(model, batch: dict, post: bool, pre: bool):
    """The model's output on one micro-batch as one THD pack: ``[mbs, L]`` log-probs of the
    labels on the last stage (vocab-parallel CE inside GPTModel), the hidden states elsewhere."""
    params = packed_seq_params(batch["position_ids"])
    flat = {k: batch[k].reshape(1, -1) for k in ("tokens", "position_ids", "labels")}
    return model(
        flat["tokens"] if pre else None,
        flat["position_ids"] if pre else None,
        None,
        labels=flat["labels"] if post else None,
        packed_seq_params=params,
    )


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def loss_func(cfg: DPOConfig, max_pairs: int, batch: dict, output_tensor: torch.Tensor):
    """(sum of the pairs' losses, number of pairs, reports) of one micro-batch."""
    from sfmed.recipes.dpo_loss import dpo_loss

    mbs = batch["tokens"].shape[0]
    token_logps = -output_tensor.float().reshape(mbs, -1)
    c, r, n_c, n_r, real = pair_logprobs(token_logps, batch, max_pairs)
    ref = batch["ref"][real].to(c.dtype)
    mean_chosen = None
    if cfg.dpo.rpo_alpha is not None:  # the global batch's mean: independent of the cut
        tot = batch["batch_chosen"][0].double()
        mean_chosen = tot[0] / tot[1].clamp(min=1.0)
    out = dpo_loss(cfg.dpo, c, r, ref[:, 0], ref[:, 1], n_c, n_r, mean_chosen_tokens=mean_chosen)
    sums = out.metric_sums()
    zero = torch.zeros((), device=c.device)
    report = torch.stack(
        [sums.get(k, zero).detach().double().to(c.device) for k in DPO_REPORT[:8]]
        + [sums.get("nll", zero).double(), n_c.double().sum()]
    )
    real_tokens = batch["real"].float().sum()
    tokens = torch.stack([real_tokens, real_tokens.new_tensor(float(batch["real"].numel()))])
    pairs = torch.tensor(int(c.numel()), dtype=torch.int, device=c.device)
    return out.losses.sum(), pairs, {"dpo": report.float(), "tokens": tokens}


def make_forward_step(cfg: DPOConfig, device, max_pairs: int):
    """The policy's ``forward_step``: one THD pack per micro-batch on every stage."""
    from megatron.core.utils import get_attr_wrapped_model

    def forward_step(data_iterator, model):
        pre = get_attr_wrapped_model(model, "pre_process")
        post = get_attr_wrapped_model(model, "post_process")
        batch = _to_device(next(data_iterator), device)
        out = _token_logps(model, batch, post, pre)
        if not post:
            return out, None
        return out, partial(loss_func, cfg, max_pairs, batch)

    return forward_step


def _ref_loss(max_pairs: int, batch: dict, output_tensor: torch.Tensor):
    mbs = batch["tokens"].shape[0]
    logps, _ = _side_sums(-output_tensor.float().reshape(mbs, -1), batch, max_pairs)
    zero = torch.zeros((), device=logps.device)
    pairs = logps.double().view(mbs, max_pairs, 2)  # (chosen, rejected) of each pair
    none = torch.zeros((), dtype=torch.int, device=logps.device)  # no loss, no tokens
    return zero, none, {"ref": pairs.detach()}


def reference_pass(trainer, chunks: list, batches: list[list[dict]], max_pairs: int) -> list:
    """Score ``batches`` (per model chunk, this step's micro-batches) with the frozen ``chunks``
    in a forward-only pass of the run's pipeline schedule; returns, on the last pipeline stage,
    one ``[mbs, max_pairs, 2]`` float64 tensor of (chosen, rejected) log-probs per micro-batch
    (empty elsewhere)."""
    from megatron.core.utils import get_attr_wrapped_model

    device = trainer.device

    def step(data_iterator, model):
        pre = get_attr_wrapped_model(model, "pre_process")
        post = get_attr_wrapped_model(model, "post_process")
        batch = _to_device(next(data_iterator), device)
        out = _token_logps(model, batch, post, pre)
        if not post:
            return out, None
        return out, partial(_ref_loss, max_pairs, batch)

    n = next(len(b) for b in batches if b is not None)
    iters = [iter(b) if b is not None else None for b in batches]
    seq_length, mbs = trainer.recipe.schedule_shape(trainer.plan)
    with torch.no_grad():
        out = trainer.forward_backward(
            forward_step_func=step,
            data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks,
            num_microbatches=n,
            seq_length=seq_length,
            micro_batch_size=mbs,
            forward_only=True,
        )
    return [d["ref"].cpu() for d in out]


class StepIterator:
    """A chunk's batch iterator that can take a step's micro-batches ahead of the schedule
    (:meth:`prefetch`), so a reference pass can score them first."""

    def __init__(self, it):
        self.it = it
        self.queue: list[dict] = []

    def prefetch(self, n: int) -> list[dict]:
        """Take the next ``n`` micro-batches out of the loader (they are served next)."""
        self.queue = [next(self.it) for _ in range(n)]
        return self.queue

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.queue:
            return self.queue.pop(0)
        return next(self.it)


# -- the reference store ---------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    """Digest of a checkpoint folder's metadata files (torch_dist's index and sfmed's sidecar):
    they change whenever the weights are rewritten, without reading the weights."""
    h = hashlib.sha256()
    for name in (".metadata", "metadata.json", "common.pt", "sfmed.json"):
        p = path / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def reference_key(cfg: DPOConfig, plan, split: str, size: int) -> dict:
    """What precomputed reference log-probs depend on: the data and its sample order, the
    layout the pass ran in, and the reference checkpoint (path and metadata files)."""
    data: DPOData = plan.recipe
    metas = [
        {k: v for k, v in _read_meta(p, "data", KIND).items() if k != "stats"}
        for p in data.prefixes
    ]
    t, par = cfg.train, cfg.parallel
    ref = data.reference
    return {
        "split": split,
        "samples": size,
        "prefixes": data.prefixes,
        "datasets": metas,
        "weights": data.weights,
        "data_split": cfg.data.split,
        "seed": t.seed,
        "sample_length": data.seq_length,
        "pad_id": data.pad_id,
        "layout": {
            "tp": par.tp,
            "pp": par.pp,
            "vpp": plan.vpp,
            "dp": plan.dp,
            "micro_batch_size": t.micro_batch_size,
            "global_batch_size": t.global_batch_size,
            "precision": plan.precision,
            "impl": plan.impl,
            "attention": plan.attention,
        },
        "reference": {"path": str(ref), "digest": _file_digest(ref)},
    }


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_reference_table(run_dir: Path, split: str, key: dict) -> np.ndarray | None:
    """Stored reference log-probs of ``split`` if their sidecar's key is ``key``."""
    side = run_dir / REF_DIR / f"{split}.json"
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("digest") != _digest(key):
        log.warning(
            "%s was computed for other data, layout or reference checkpoint; recomputing", side
        )
        return None
    try:
        table = np.load(run_dir / REF_DIR / f"{split}.npy")
    except (OSError, ValueError):
        return None
    return table if table.shape[0] == key["samples"] else None


def save_reference_table(run_dir: Path, split: str, key: dict, table: np.ndarray) -> None:
    """Write the table, then its sidecar (whose presence and digest mark it complete)."""
    from sfmed.core.atomic import atomic_write_text

    d = run_dir / REF_DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{split}.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, table)
        f.flush()
        os.fsync(f.fileno())
    (d / f"{split}.json").unlink(missing_ok=True)
    os.replace(tmp, d / f"{split}.npy")
    text = json.dumps({"digest": _digest(key), "key": key}, indent=1)
    atomic_write_text(d / f"{split}.json", text)


# -- the recipe ------------------------------------------------------------------------------------


class DPORecipe(Recipe):
    """Preference alignment: DPO and its variants against a frozen reference."""

    kind = "dpo"
    config_class = DPOConfig
    reports = {"dpo": len(DPO_REPORT), "tokens": 2}
    # init_from an SFT or pretraining checkpoint starts a DPO run; resuming is for DPO runs.

    def __init__(self, cfg: DPOConfig):
        super().__init__(cfg)
        self._seq: int | None = None
        self._trainer = None
        self._reference: list | None = None

    def seq_length(self) -> int:
        """Tokens per sample (see :func:`sample_length`)."""
        if self._seq is None:
            self._seq = sample_length(self.cfg)
        return self._seq

    def schedule_shape(self, plan) -> tuple[int, int]:
        """A micro-batch travels between stages as one ``[mbs * L, 1]`` pack."""
        return plan.seq_length * self.cfg.train.micro_batch_size, 1

    def resolve(self, plan) -> DPOData:
        """Check the data and the reference before any work."""
        cfg = self.cfg
        check_packed_run(cfg, plan, "DPO")
        base = resolve_data(cfg, plan.arch.vocab_size, kind=KIND)
        longest, pairs = 0, 1
        for p in base.prefixes:
            n, k = _max_sample(p)
            longest, pairs = max(longest, n), max(pairs, k)
        seq = plan.seq_length
        if longest > seq:
            raise ConfigError(
                f"data.seq_length={seq} is shorter than the longest sample ({longest} tokens: "
                "a pair's two sides, or a pack of pairs); use data.seq_length="
                f"{longest} or leave it null"
            )
        ref = self._reference_checkpoint(plan)
        return DPOData(**vars(replace(base, seq_length=seq)), max_pairs=pairs, reference=ref)

    def _reference_checkpoint(self, plan) -> Path | None:
        from sfmed.core import megatron_layout as layout

        cfg = self.cfg
        if cfg.dpo.reference_free:
            return None
        src, key = cfg.reference.checkpoint, "reference.checkpoint"
        if src is None:
            src, key = cfg.init_from, "init_from"
        if src is None:
            raise ConfigError(
                "DPO needs a reference model: set init_from=<the SFT checkpoint> (the policy "
                "starts from it and it is the reference), or reference.checkpoint=<path>, or "
                "dpo.reference_free=true"
            )
        try:
            ref = layout.resolve_checkpoint(src)
        except layout.CheckpointNotFoundError as e:
            raise ConfigError(
                f"{key}={src}: {e}. Give the Megatron checkpoint of the reference (an SFT run's "
                "folder, or launch/convert.py to=mcore output)"
            ) from e
        meta = layout.read_meta(ref)
        arch = meta.get("arch") or {}
        if arch and arch.get("hidden_size") not in (None, plan.arch.hidden_size):
            raise ConfigError(
                f"{key}={src} holds a model with hidden_size={arch.get('hidden_size')}, but the "
                f"policy has {plan.arch.hidden_size}; the reference must be the same "
                "architecture (usually the policy's init_from)"
            )
        return ref

    def describe(self, plan) -> str:
        """Datasets, sample length, loss and reference."""
        data, c = plan.recipe, self.cfg
        ref = "none (reference_free)" if c.dpo.reference_free else c.reference.mode
        return (
            f"dpo ({c.dpo.loss_type}, beta {c.dpo.beta}) on {len(data.prefixes)} dataset(s) "
            f"({sum(data.samples)} samples, up to {data.max_pairs} pairs each), sample length "
            f"{data.seq_length}, reference {ref}"
        )

    def _uses_model(self) -> bool:
        return not self.cfg.dpo.reference_free

    def extra_models(self, trainer) -> dict[str, list]:
        """The frozen reference when it runs on the fly (precompute builds it only if needed)."""
        self._trainer = trainer
        # megatron's dropout would make the two log-prob passes differ (and the step-0 gate fail)
        tc = trainer.tf_config
        if tc.hidden_dropout or tc.attention_dropout:
            raise RuntimeError(
                f"the model has dropout (hidden {tc.hidden_dropout}, attention "
                f"{tc.attention_dropout}); DPO needs it off so policy and reference agree"
            )
        if self._uses_model() and self.cfg.reference.mode == "on_the_fly":
            self._reference = trainer.build_frozen_model(trainer.plan.recipe.reference)
            return {"reference": self._reference}
        return {}

    def build_datasets(self, plan):
        """(train, valid) :class:`PreferenceSamples`; precomputed reference log-probs attached."""
        t = self.cfg.train
        data = plan.recipe
        train_parts, valid_parts = split_parts(data, self.cfg.data.split_weights, t.seed)
        gbs = t.global_batch_size
        rpo = self.cfg.dpo.rpo_alpha is not None
        train = PreferenceSamples(data, train_parts, t.steps * gbs, t.seed, gbs, rpo)
        valid = None
        if t.eval_interval and all(len(p) for p in valid_parts):
            valid = PreferenceSamples(data, valid_parts, t.eval_iters * gbs, t.seed + 1, gbs, rpo)
        elif t.eval_interval:
            log.warning("a dataset has no validation samples at data.split=%s", self.cfg.data.split)
        if self._uses_model() and self.cfg.reference.mode == "precompute":
            for split, ds in (("train", train), ("valid", valid)):
                if ds is not None:
                    ds.ref_table = self._precomputed(plan, split, ds)
            self._reference = None  # free the reference weights: training needs only the table
        return train, valid

    def _precomputed(self, plan, split: str, ds: PreferenceSamples) -> np.ndarray:
        import torch.distributed as dist

        key = reference_key(self.cfg, plan, split, len(ds))
        got = [None]
        if dist.get_rank() == 0:
            got = [load_reference_table(plan.run_dir, split, key) is not None]
        dist.broadcast_object_list(got, src=0)
        if got[0]:
            table = load_reference_table(plan.run_dir, split, key)
            if table is not None:
                log.info("reference log-probs of %s reused from %s", split, plan.run_dir / REF_DIR)
                return table
        trainer = self._trainer
        if self._reference is None:
            self._reference = trainer.build_frozen_model(plan.recipe.reference)
        log.info("precomputing the reference log-probs of %d %s samples", len(ds), split)
        table = self._score_all(trainer, ds)
        if dist.get_rank() == 0:
            save_reference_table(plan.run_dir, split, key, table)
        dist.barrier()
        return table

    def _score_all(self, trainer, ds: PreferenceSamples) -> np.ndarray:
        """Every sample's reference log-probs, step by step in the training layout, summed into
        one table on every rank."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from sfmed.train.data import make_loader

        plan, data = trainer.plan, ds.data
        table = torch.zeros((len(ds), data.max_pairs, 2), dtype=torch.float64)
        loader = iter(make_loader(ds, 0, self.cfg, plan, len(ds), self.num_workers()))
        keep = ps.is_pipeline_last_stage(ignore_virtual=True) and (
            ps.get_tensor_model_parallel_rank() == 0
        )
        for _ in range(len(ds) // self.cfg.train.global_batch_size):
            batches = [next(loader) for _ in range(plan.num_microbatches)]
            refs = reference_pass(
                trainer, self._reference, [batches] * len(self._reference), data.max_pairs
            )
            if keep:
                for b, r in zip(batches, refs, strict=True):
                    table[b["sample"]] = r
        dev = trainer.device
        t = table.to(dev)
        dist.all_reduce(t)  # one (last stage, TP rank 0) rank per DP rank wrote each sample
        return t.cpu().numpy()

    def iterators(self, dataset, consumed, plan, model, total=None) -> list:
        """One :class:`StepIterator` per model chunk (middle stages need the boundaries)."""
        from sfmed.train.data import make_loader

        return [
            StepIterator(
                iter(make_loader(dataset, consumed, self.cfg, plan, total, self.num_workers()))
            )
            for _ in model
        ]

    def num_workers(self) -> int:
        """``data.num_workers``."""
        return self.cfg.data.num_workers

    def prepare_step(self, trainer, data_iterators: list) -> None:
        """On the fly: score this step's micro-batches with the frozen reference first."""
        if not self._uses_model() or self.cfg.reference.mode != "on_the_fly":
            return
        n = trainer.plan.num_microbatches
        queues = [it.prefetch(n) for it in data_iterators]
        refs = reference_pass(trainer, self._reference, queues, trainer.plan.recipe.max_pairs)
        if refs:
            for q in queues:
                for b, r in zip(q, refs, strict=True):
                    b["ref"] = r

    def forward_step(self, trainer):
        """THD forward step of the policy on the trainer's device."""
        return make_forward_step(self.cfg, trainer.device, trainer.plan.recipe.max_pairs)

    def summarize(self, totals: dict[str, list[float]]) -> StepReport:
        """Means over the global batch's pairs (``nll`` per chosen token); throughput over
        real (non-pad) tokens."""
        s = dict(zip(DPO_REPORT, totals["dpo"], strict=True))
        pairs = max(s["pairs"], 1.0)
        real, capacity = totals["tokens"]
        metrics = {k: s[k] / pairs for k in DPO_REPORT[2:8]}
        if self.cfg.dpo.rpo_alpha is not None:
            metrics["nll"] = s["nll"] / max(s["chosen_tokens"], 1.0)
        metrics.update(
            pairs=s["pairs"],
            real_tokens=real,
            packing_efficiency=real / capacity if capacity else 0.0,
        )
        return StepReport(
            loss=s["loss"] / pairs, loss_tokens=s["pairs"], tokens=real, metrics=metrics
        )

    def metadata(self) -> dict:
        """The loss and the reference, in the checkpoint's origin."""
        ref = self._trainer.plan.recipe.reference if self._trainer else None
        return {
            "dpo": {
                "loss_type": self.cfg.dpo.loss_type,
                "beta": self.cfg.dpo.beta,
                "reference": None if ref is None else str(ref),
            }
        }
