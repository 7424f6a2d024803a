"""Blend weights travel from the config to the samples the trainer reads.

Two datasets with disjoint token ranges are blended 0.9/0.1 through the real path
(``make_plan`` → ``PretrainRecipe.resolve`` → ``PretrainRecipe.build_datasets``); the source of
every training sample is told by its tokens and counted. A uniform mixture (weights dropped)
gives 0.5/0.5 and fails; so does swapping the weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

EOD = 999
SPLIT = 500  # dataset "a" uses ids 3..499, dataset "b" 500..998


def _corpus(prefix: str, low: int, high: int, seed: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(seed)
    for _ in range(200):
        doc = np.concatenate([rng.integers(low, high, size=int(rng.integers(10, 60))), [EOD]])
        b.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    b.finalize(prefix + ".idx")


def _source(tokens: torch.Tensor) -> str:
    t = tokens[tokens != EOD]
    if bool((t < SPLIT).all()):
        return "a"
    if bool((t >= SPLIT).all()):
        return "b"
    raise AssertionError(f"a sample mixes both datasets: {tokens.tolist()}")


@pytest.fixture
def process_group():
    """A one-process gloo group: megatron's dataset builders ask for the rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize("weights", [(0.9, 0.1), (0.1, 0.9)])
def test_trainer_samples_follow_the_blend_weights(tmp_path, weights):
    from omegaconf import OmegaConf

    from sfmed.config.pretrain import PretrainConfig
    from sfmed.recipes.pretrain import PretrainRecipe
    from sfmed.train.plan import make_plan

    a, b = str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")
    _corpus(a, 3, SPLIT, 0)
    _corpus(b, SPLIT, EOD, 1)
    steps, gbs = 100, 8
    cfg = OmegaConf.structured(PretrainConfig)
    cfg = OmegaConf.merge(cfg, {
        "device": "cpu", "ckpt_dir": str(tmp_path / "run"),
        "train": {"steps": steps, "global_batch_size": gbs, "micro_batch_size": 1},
        "optim": {"warmup_steps": 0},
        "data": {"seq_length": 32, "eod_id": EOD, "require_metadata": False,
                 "blend": [{"prefix": a, "weight": weights[0]},
                           {"prefix": b, "weight": weights[1]}]},
    })  # fmt: skip
    cfg = OmegaConf.to_object(cfg)
    recipe = PretrainRecipe(cfg)
    plan = make_plan(cfg, recipe, world_size=1)
    train, _ = recipe.build_datasets(plan)
    n = steps * gbs
    counts = {"a": 0, "b": 0}
    for i in range(n):  # the samples the run reads, in its order (consumed_samples = i)
        counts[_source(torch.as_tensor(train[i]["tokens"]))] += 1
    share_a = counts["a"] / n
    # 800 samples: megatron's blend interleaves deterministically, within 2 points of the
    # weight; a uniform mixture (0.5) or swapped weights are 40 points off.
    assert abs(share_a - weights[0]) < 0.02, counts
