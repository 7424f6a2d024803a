"""The loss is a mean over every loss token of the global batch, however the batch is cut.

The recipe's loss function returns (sum, count) and megatron's schedules run with
``calculate_per_token_loss``; so with ``data.eod_mask_loss=true`` (micro-batches with different
numbers of loss tokens) the loss and the gradients of mbs=1×ga=4, mbs=2×ga=2 and DP=2 must agree.
A per-micro-batch mean would weight the micro-batches equally instead and fail these checks.

The DP=2 run also uses the distributed optimizer with overlapped gradient reduce-scatter and
parameter all-gather: its final checkpoint must hold the weights after the last update (megatron
launches that all-gather only at the next forward, so a save must force it first), which the
comparison of the saved weights with the single-process runs' checks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO

EOD = 999
SEQ, GBS, STEPS, LR = 32, 4, 3, 3e-3
LAYOUTS = {  # name -> (processes, overrides)
    "mbs1_ga4": (1, ["train.micro_batch_size=1", "train.save_interval=0"]),
    "mbs2_ga2": (1, ["train.micro_batch_size=2", "train.save_interval=0"]),
    # also saves after step 2: training goes on after the forced parameter sync
    "dp2_mbs1_ga2": (2, ["train.micro_batch_size=1", "train.save_interval=2",
                         "parallel.use_distributed_optimizer=true",
                         "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]),
}  # fmt: skip


# -- the loss function against a hand computation ------------------------------------------------


def test_loss_func_sums_and_counts_uneven_masks():
    from sfmed.recipes.pretrain import PretrainRecipe, loss_func

    # Two micro-batches of per-token losses with 2 and 1 loss tokens.
    mb = [
        (torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[1, 1, 0, 0]])),
        (torch.tensor([[10.0, 20.0, 30.0, 40.0]]), torch.tensor([[0, 0, 0, 1]])),
    ]
    totals = {"lm loss": [0.0, 0.0], "tokens": [0.0]}
    for losses, mask in mb:
        losses.requires_grad_(True)
        loss, count, reports = loss_func(mask, losses)
        loss.backward()
        assert losses.grad.tolist() == mask.float().tolist()  # d(sum)/d(token loss) = mask
        totals["lm loss"] = [a + b for a, b in zip(totals["lm loss"], reports["lm loss"].tolist())]
        totals["tokens"][0] += reports["tokens"].item()
    assert totals["lm loss"] == [1.0 + 2.0 + 40.0, 3.0]
    assert totals["tokens"] == [8.0]
    rep = PretrainRecipe.summarize(None, totals)
    # mean over the 3 loss tokens (a mean of per-micro-batch means would be (1.5 + 40) / 2)
    assert rep.loss == pytest.approx(43.0 / 3) and rep.loss_tokens == 3 and rep.tokens == 8


def test_loss_func_with_an_empty_mask_counts_zero():
    from sfmed.recipes.pretrain import PretrainRecipe, loss_func

    loss, count, reports = loss_func(torch.zeros(2, 3), torch.ones(2, 3))
    assert loss.item() == 0.0 and int(count) == 0 and reports["lm loss"].tolist() == [0.0, 0.0]
    assert PretrainRecipe.summarize(None, {"lm loss": [0.0, 0.0], "tokens": [6.0]}).loss == 0.0


# -- three layouts of the same global batch ------------------------------------------------------


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _saved(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model weights, the optimizer's fp32 master weights) of a torch_dist checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / f"{ckpt.parent.name}_{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    sd = {k: v for k, v in torch.load(out, weights_only=False).items() if torch.is_tensor(v)}
    master = "optimizer.state.param."
    weights = {k: v for k, v in sd.items() if not k.startswith("optimizer.")}
    return weights, {k[len(master) :]: v for k, v in sd.items() if k.startswith(master)}


def _expected_loss_tokens(prefix: str, run: Path) -> list[list[int]]:
    """Per step and sample: the positions whose input token is not EOD (megatron's
    ``eod_mask_loss``: no loss on predicting across a document boundary), read with
    megatron-core's GPTDataset from the run's sample-index cache (the trainer's sample order)
    and counted here."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    class Ids:
        vocab_size, eod = 1000, EOD
        unique_identifiers = {"class": "sfmed.TokenIds", "vocab_size": 1000}

    cfg = GPTDatasetConfig(
        random_seed=1234, sequence_length=SEQ, blend=([prefix], None), split="99,1,0",
        path_to_cache=str(run / "data_cache"), tokenizer=Ids(), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=True, create_attention_mask=False,
        mmap_bin_files=True,
    )  # fmt: skip
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [STEPS * GBS, 0, 0], lambda: True, cfg
    ).build()
    return [
        [int((train[i]["tokens"] != EOD).sum()) for i in range(step * GBS, (step + 1) * GBS)]
        for step in range(STEPS)
    ]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Train the same 3 steps from the same random init under each layout."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("lossnorm")
    prefix = str(root / "corpus_text_document")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(300):  # short and long documents: samples hold very different numbers of EODs
        n = int(rng.integers(1, 4) if rng.random() < 0.5 else rng.integers(20, 90))
        doc = np.concatenate([rng.integers(3, EOD, size=n), [EOD]])
        b.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    b.finalize(prefix + ".idx")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = {"prefix": prefix, "runs": {}}
    procs = {}
    for name, (nproc, over) in LAYOUTS.items():  # concurrently: start-up dominates
        run = root / name
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={_port()}",
            str(REPO / "launch" / "pretrain.py"), "device=cpu", "model=tiny",
            f"data.prefix={prefix}", f"data.seq_length={SEQ}", "data.num_workers=0",
            "data.eod_mask_loss=true", f"data.eod_id={EOD}", f"train.steps={STEPS}",
            f"train.global_batch_size={GBS}", f"optim.lr={LR}", "optim.decay_style=constant",
            "optim.warmup_steps=0", "logging.level=WARNING", f"ckpt_dir={run}", *over,
        ]  # fmt: skip
        log = open(root / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        cwd=REPO), log)  # fmt: skip
        out["runs"][name] = run
    failed = []
    for name, (proc, log) in procs.items():
        try:
            rc = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failed.append(f"{name} exited {rc}\n{(root / f'{name}.log').read_text()[-4000:]}")
    if failed:
        pytest.fail("\n".join(failed))
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.dist
@pytest.mark.slow
def test_logged_loss_tokens_count_every_non_eod_label(layouts):
    name = next(iter(LAYOUTS))
    per_sample = _expected_loss_tokens(layouts["prefix"], layouts["runs"][name])
    # uneven: the checks mean something only if micro-batches differ in loss tokens
    assert max(map(max, per_sample)) - min(map(min, per_sample)) >= 4, per_sample
    expected = [sum(step) for step in per_sample]
    for name, run in layouts["runs"].items():
        assert [r["tokens"] for r in _metrics(run)] == expected, name


@pytest.mark.dist
@pytest.mark.slow
def test_loss_and_gradients_do_not_depend_on_the_batch_layout(layouts):
    ref_name, *others = LAYOUTS
    ref = _metrics(layouts["runs"][ref_name])
    assert len(ref) == STEPS
    for name in others:
        got = _metrics(layouts["runs"][name])
        for a, b in zip(ref, got, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (name, a["step"])
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (name, a["step"])


@pytest.mark.dist
@pytest.mark.slow
def test_saved_weights_hold_the_last_update_in_every_layout(layouts):
    """Each checkpoint's model weights equal its optimizer's fp32 master weights (the live ones
    after the last update), and the same in every layout. Without a forced parameter
    all-gather before the save, the DP=2 run's model weights outside a rank's own shard are
    those of step 2 (off by about one update, ~lr = 3e-3)."""
    ckpt = f"iter_{STEPS:07d}"
    saved = {name: _saved(run / ckpt) for name, run in layouts["runs"].items()}
    # the DP=2 run also saved mid-run (after step 2) and trained on
    assert (layouts["runs"]["dp2_mbs1_ga2"] / "iter_0000002").is_dir()
    mid = {"dp2_mbs1_ga2 step 2": _saved(layouts["runs"]["dp2_mbs1_ga2"] / "iter_0000002")}
    for name, (weights, master) in {**saved, **mid}.items():
        assert weights and master.keys() <= weights.keys(), name
        for k, live in master.items():
            assert torch.equal(weights[k], live), (name, k, (weights[k] - live).abs().max())
    ref_name, *others = LAYOUTS
    ref = saved[ref_name][0]
    assert all(torch.isfinite(v).all() for v in ref.values())
    for name in others:
        got = saved[name][0]
        assert got.keys() == ref.keys(), name
        worst = max((got[k].float() - ref[k].float()).abs().max().item() for k in ref)
        assert worst < LR / 30, (name, worst)
