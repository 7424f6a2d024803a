"""Supervised fine-tuning on megatron-core: packed conversations, no cross-talk, global-batch mean.

Data: chat datasets written by ``launch/preprocess.py format=sft`` (:mod:`sfmed.data.chat.store`),
one ``data.prefix`` or a ``data.blend`` drawn by weight. Every sample (a pack of conversations,
or one) is padded to ``seq_length`` with one more "padding sequence", so a micro-batch is a
fixed-size tensor. The sample order is a pure function of the seed, the blend and the number of
samples (like pretraining's), so the shared trainer's ``consumed_samples`` resumes exactly.

Isolation: the forward step sends each micro-batch through the model as **one THD pack**
(``[1, mbs * seq_length]`` tokens) with megatron-core's ``PackedSeqParams`` (``cu_seqlens`` at
every conversation start, found where ``position_ids`` restart at 0). Transformer Engine's
attention takes it natively; without TE, sfmed's :class:`~sfmed.models.attention.SDPAttention`
applies a block-diagonal causal mask (or a varlen / FlexAttention kernel on GPU). RoPE restarts
per conversation through the same ``cu_seqlens``; labels never cross a boundary (the dataset
sets the last token of each conversation to predict nothing). Every pipeline stage — middle ones
too — reads the batch's positions and builds the same ``PackedSeqParams``.

Loss: the loss function returns (sum over supervised tokens, their count); the schedule runs with
``calculate_per_token_loss=True``, so the loss and the gradients are the mean over the
supervised tokens of the **global** batch, whatever its split into micro-batches and DP ranks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from sfmed.config.sft import SFTConfig
from sfmed.core.errors import ConfigError
from sfmed.recipes.base import Recipe, StepReport

log = logging.getLogger(__name__)


# -- loss and forward step (pure tensor code) ------------------------------------------------------


def loss_func(loss_mask: torch.Tensor, real: torch.Tensor, output_tensor: torch.Tensor):
    """(summed loss over supervised tokens, their count, reports) for the schedule.

    Reports: ``lm loss`` = [loss sum, supervised tokens], ``tokens`` = [non-pad tokens,
    positions (capacity)].
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss = torch.sum(losses * mask)
    count = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), count.float()])
    capacity = torch.tensor(float(mask.numel()), device=report.device)
    tokens = torch.stack([real.float().sum().to(report.device), capacity])
    return loss, count, {"lm loss": report, "tokens": tokens}


def packed_seq_params(position_ids: torch.Tensor):
    """megatron-core ``PackedSeqParams`` (THD) of a ``[b, s]`` batch laid end to end: a sequence
    starts wherever its position id is 0 (the dataset restarts positions per conversation)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).view(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("position_ids of a packed batch must start at 0")
    end = torch.tensor([flat.numel()], device=flat.device)
    cu = torch.cat([starts, end]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


def make_forward_step(device: torch.device):
    """``forward_step(data_iterator, model)``: each micro-batch as one THD pack, on every stage."""
    from megatron.core.utils import get_attr_wrapped_model

    def forward_step(data_iterator, model):
        pre = get_attr_wrapped_model(model, "pre_process")
        post = get_attr_wrapped_model(model, "post_process")
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        # Every stage (middle ones too) needs the boundaries: attention and RoPE use them.
        params = packed_seq_params(batch["position_ids"])
        flat = {k: v.reshape(1, -1) for k, v in batch.items()}
        out = model(
            flat["tokens"] if pre else None,
            flat["position_ids"] if pre else None,
            None,
            labels=flat["labels"] if post else None,
            packed_seq_params=params,
        )
        if not post:
            return out, None
        return out, partial(loss_func, flat["loss_mask"], flat["real"])

    return forward_step


# -- data ------------------------------------------------------------------------------------------


@dataclass
class SFTData:
    """The resolved SFT data: absolute prefixes, weights, sequence length, padding id."""

    prefixes: list[str]
    weights: list[float]
    seq_length: int
    pad_id: int
    samples: list[int]
    """Samples (packs) per dataset."""


# Names of each chat-data kind in messages (the ``format=`` of launch/preprocess.py is the kind).
KIND_NAMES = {"sft": "SFT", "preference": "preference"}


def _read_meta(prefix: str, key: str, kind: str = "sft") -> dict:
    from sfmed.data.chat.store import complete_meta

    if prefix.endswith((".bin", ".idx", ".json")):
        raise ConfigError(
            f"{key}={prefix} ends in {Path(prefix).suffix}; give the prefix without the extension"
        )
    meta = complete_meta(prefix)
    if meta is None:
        raise ConfigError(
            f"{key}={prefix} is not a complete {KIND_NAMES[kind]} dataset ({prefix}.bin/.idx, "
            f"{prefix}_mask.*, {prefix}.json); fix the path or create it with python "
            f"launch/preprocess.py format={kind} ..."
        )
    if meta.get("kind") != kind:
        raise ConfigError(
            f"{key}={prefix} holds {meta.get('kind')!r} data, not {kind}; give an output of "
            f"launch/preprocess.py format={kind}"
        )
    return meta


def _entries(cfg, kind: str = "sft") -> list[tuple[str, float, str]]:
    d = cfg.data
    if d.prefix is None and not d.blend:
        name = KIND_NAMES[kind]
        raise ConfigError(
            f"no {name} data: set data.prefix=<path without .bin/.idx> or data.blend=[{{prefix: "
            f"..., weight: ...}}, ...] (make {name} datasets with launch/preprocess.py "
            f"format={kind})"
        )
    if d.prefix is not None:
        return [(str(d.prefix), 1.0, "data.prefix")]
    return [
        (str(e["prefix"]), float(e.get("weight", 1.0)), f"data.blend[{i}].prefix")
        for i, e in enumerate(d.blend)
    ]


def resolve_data(cfg, vocab_size: int | None = None, kind: str = "sft") -> SFTData:
    """Check ``cfg.data`` (of a chat stage whose datasets are ``kind``) against the datasets'
    sidecars (no big reads) and resolve it."""
    d = cfg.data
    entries = _entries(cfg, kind)
    metas = [_read_meta(p, k, kind) for p, _, k in entries]
    lengths = {int(m["seq_length"]) for m in metas}
    if d.seq_length is None and len(lengths) > 1:
        raise ConfigError(
            f"the datasets were prepared for different seq_lengths {sorted(lengths)}; set "
            f"data.seq_length={max(lengths)} (shorter samples are padded)"
        )
    seq = d.seq_length if d.seq_length is not None else lengths.pop()
    for (p, _, key), m in zip(entries, metas, strict=True):
        if int(m["seq_length"]) > seq:
            raise ConfigError(
                f"{key}={p} was prepared with chat.seq_length={m['seq_length']} > "
                f"data.seq_length={seq}; use data.seq_length={m['seq_length']} or preprocess "
                f"again with chat.seq_length={seq}"
            )
        mask = getattr(d, "mask", None)  # SFT only: preference masks are fixed
        if mask is not None and m.get("mask") != mask:
            raise ConfigError(
                f"{key}={p} was prepared with chat.mask={m.get('mask')!r}, not data.mask="
                f"{mask!r}; preprocess it again with chat.mask={mask} or drop data.mask"
            )
        packed = ((m.get("stats") or {}).get("packing") or {}).get("packed")
        if d.packed is not None and packed is not None and bool(packed) != d.packed:
            raise ConfigError(
                f"{key}={p} was prepared with chat.pack={str(bool(packed)).lower()}, not "
                f"data.packed={str(d.packed).lower()}; preprocess it again or drop data.packed"
            )
        tvocab = (m.get("tokenizer") or {}).get("vocab_size")
        if vocab_size is not None and tvocab is not None and int(tvocab) > vocab_size:
            raise ConfigError(
                f"{key}={p} was tokenized with a vocabulary of {tvocab} tokens but the model has "
                f"{vocab_size}; preprocess with the model's tokenizer"
            )
    pad = d.pad_id
    if pad is None:
        pad = (metas[0].get("tokenizer") or {}).get("eod_id") or 0
    from sfmed.data.chat.store import ChatDataset

    counts = [len(ChatDataset(p)) for p, _, _ in entries]
    for (p, _, key), n in zip(entries, counts, strict=True):
        if n == 0:
            raise ConfigError(f"{key}={p} holds no samples; check its preprocessing report")
    prefixes = [os.path.abspath(p) for p, _, _ in entries]
    total = sum(w for _, w, _ in entries)
    return SFTData(prefixes, [w / total for _, w, _ in entries], int(seq), int(pad), counts)


def blend_index(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset, sample-within-dataset) of ``size`` draws in proportion to ``weights``:
    megatron-core's greedy rule (each draw goes to the dataset furthest below its share)."""
    w = np.asarray(weights, np.float64)
    which = np.empty(size, np.int64)
    nth = np.empty(size, np.int64)
    counts = np.zeros(len(w), np.int64)
    for i in range(size):
        k = int(np.argmax(w * (i + 1) - counts))
        which[i], nth[i] = k, counts[k]
        counts[k] += 1
    return which, nth


class SFTSamples(torch.utils.data.Dataset):
    """``size`` fixed-length training samples drawn from one part of each SFT dataset.

    Sample ``i`` is a pure function of (seed, datasets, weights, split, i): dataset ``k`` serves
    its ``n``-th draw from epoch ``n // len`` of its part, in a permutation seeded by (seed, k,
    epoch). Items are ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (``[seq_length]``)
    and ``real`` (1 on tokens of a conversation, 0 on padding).
    """

    dataset_class = "SFTDataset"
    """The :mod:`sfmed.data.chat.store` reader of the datasets."""

    def __init__(self, data: SFTData, parts: list[np.ndarray], size: int, seed: int):
        self.data, self.parts, self.size, self.seed = data, parts, size, seed
        self.which, self.nth = blend_index(data.weights, size)
        self._ds = None
        self._perm: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.size

    def _datasets(self):
        if self._ds is None:  # opened lazily: DataLoader workers memory-map their own copies
            from sfmed.data.chat import store

            cls = getattr(store, self.dataset_class)
            self._ds = [cls(p) for p in self.data.prefixes]
        return self._ds

    def _order(self, k: int, epoch: int) -> np.ndarray:
        key = (k, epoch)
        if key not in self._perm:
            rng = np.random.default_rng([self.seed, k, epoch])
            self._perm = {key: self.parts[k][rng.permutation(len(self.parts[k]))]}
        return self._perm[key]

    def raw(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i`` as its dataset returns it (unpadded)."""
        k, n = int(self.which[i]), int(self.nth[i])
        part = self.parts[k]
        idx = int(self._order(k, n // len(part))[n % len(part)])
        return self._datasets()[k][idx]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.padded(self.raw(i))

    def padded(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A raw sample as a fixed-length training item (see the class docstring)."""
        from sfmed.data.chat.store import IGNORE_INDEX, ChatDataset

        real = raw["tokens"].shape[0]
        s = ChatDataset.pad(raw, self.data.seq_length, self.data.pad_id)
        labels = s["labels"]
        # -100 (no target) becomes a valid id; its loss_mask is 0 so it never counts.
        labels = np.where(labels == IGNORE_INDEX, self.data.pad_id, labels)
        mark = np.zeros(self.data.seq_length, np.float32)
        mark[:real] = 1.0
        return {
            "tokens": s["tokens"],
            "labels": labels,
            "loss_mask": s["loss_mask"],
            "position_ids": s["position_ids"],
            "real": mark,
        }


def split_parts(data: SFTData, split: tuple[float, float, float], seed: int):
    """Per dataset, (train, valid) sample indices: a seeded permutation cut by ``split``."""
    train, valid = [], []
    total = sum(split)
    for k, n in enumerate(data.samples):
        perm = np.random.default_rng([seed, k, 2**31 - 1]).permutation(n)
        n_train = n if split[1] == 0 and split[2] == 0 else int(round(n * split[0] / total))
        n_valid = int(round(n * split[1] / total))
        n_train = max(1, min(n_train, n))
        train.append(perm[:n_train])
        valid.append(perm[n_train : n_train + n_valid])
    return train, valid


# -- the recipe ------------------------------------------------------------------------------------


def check_packed_run(cfg, plan, stage: str) -> None:
    """What a run on packed chat samples (SFT, DPO) cannot do, refused before any work."""
    t, d = cfg.train, cfg.data
    if cfg.parallel.cp != 1:
        raise ConfigError(
            f"parallel.cp={cfg.parallel.cp}: {stage} packs run with context parallelism 1"
        )
    if plan.impl == "local" and plan.attention == "unfused":
        raise ConfigError(
            "model.attention_backend=unfused: megatron's DotProductAttention refuses packed "
            "sequences; use model.attention_backend=sdpa (or flash, or "
            "model.transformer_impl=transformer_engine)"
        )
    if t.eval_interval and d.split_weights[1] == 0:
        # 98/2/0, not 98,2,0: Hydra's command line reads the commas as a list
        raise ConfigError(
            f"train.eval_interval={t.eval_interval} but data.split={d.split!r} has no "
            "validation part; use e.g. data.split=98/2/0 or train.eval_interval=0"
        )


class SFTRecipe(Recipe):
    """Full-parameter SFT: loss over supervised tokens, packs isolated per conversation."""

    kind = "sft"
    config_class = SFTConfig
    reports = {"lm loss": 2, "tokens": 2}
    # Starting SFT from a pretraining checkpoint is init_from; resuming is for SFT runs only.

    def __init__(self, cfg: SFTConfig):
        super().__init__(cfg)
        self._seq: int | None = None

    def seq_length(self) -> int:
        """``data.seq_length``, or the ``chat.seq_length`` the datasets were prepared with."""
        if self._seq is None:
            d = self.cfg.data
            if d.seq_length is not None:
                self._seq = d.seq_length
            else:
                lengths = {int(_read_meta(p, k)["seq_length"]) for p, _, k in _entries(self.cfg)}
                if len(lengths) > 1:
                    raise ConfigError(
                        f"the datasets were prepared for different seq_lengths {sorted(lengths)}; "
                        f"set data.seq_length={max(lengths)}"
                    )
                self._seq = lengths.pop()
        return self._seq

    def schedule_shape(self, plan) -> tuple[int, int]:
        """A micro-batch travels between stages as one ``[mbs * seq_length, 1]`` pack."""
        return plan.seq_length * self.cfg.train.micro_batch_size, 1

    def resolve(self, plan) -> SFTData:
        """Check the data settings against the datasets' sidecars."""
        check_packed_run(self.cfg, plan, "SFT")
        return resolve_data(self.cfg, plan.arch.vocab_size)

    def describe(self, plan) -> str:
        """Datasets, sequence length and padding id."""
        data = plan.recipe
        return (
            f"sft on {len(data.prefixes)} dataset(s) ({sum(data.samples)} samples), "
            f"seq {data.seq_length}, pad id {data.pad_id}"
        )

    def build_datasets(self, plan):
        """(train, valid) :class:`SFTSamples` sized for the run."""
        t = self.cfg.train
        data = plan.recipe
        train_parts, valid_parts = split_parts(data, self.cfg.data.split_weights, t.seed)
        train = SFTSamples(data, train_parts, t.steps * t.global_batch_size, t.seed)
        valid = None
        if t.eval_interval and all(len(p) for p in valid_parts):
            valid = SFTSamples(data, valid_parts, t.eval_iters * t.global_batch_size, t.seed + 1)
        elif t.eval_interval:
            log.warning("a dataset has no validation samples at data.split=%s", self.cfg.data.split)
        return train, valid

    def iterators(self, dataset, consumed, plan, model, total=None) -> list:
        """One iterator per model chunk, middle stages included (they need the boundaries)."""
        from sfmed.train.data import make_loader

        return [
            iter(make_loader(dataset, consumed, self.cfg, plan, total, self.num_workers()))
            for _ in model
        ]

    def num_workers(self) -> int:
        """``data.num_workers``."""
        return self.cfg.data.num_workers

    def forward_step(self, trainer):
        """THD forward step on the trainer's device."""
        return make_forward_step(trainer.device)

    def summarize(self, totals: dict[str, list[float]]) -> StepReport:
        """Mean over supervised tokens; throughput and MFU over real (non-pad) tokens."""
        loss_sum, supervised = totals["lm loss"]
        real, capacity = totals["tokens"]
        return StepReport(
            loss=loss_sum / max(supervised, 1.0),
            loss_tokens=supervised,
            tokens=real,
            metrics={
                "real_tokens": real,
                "packing_efficiency": real / capacity if capacity else 0.0,
                "supervised_fraction": supervised / capacity if capacity else 0.0,
            },
        )
