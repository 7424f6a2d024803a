"""Helpers of the DPO HF-engine tests: a toy preference set with a learnable rule, engine
configs, and pair log-probs computed one sequence at a time with plain transformers."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

QUESTIONS = ["头痛两周了", "糖尿病能吃西瓜吗", "孩子咳嗽", "胸口疼", "高血压饮食", "发烧三天"]
# The rule to learn: the chosen answer always recommends seeing a doctor.
GOOD = ["建议尽快就医检查。", "请到医院就诊。", "最好去看医生。"]
BAD = ["忍一忍就好。", "不用管它。", "多睡觉。", "自己买点药吃。"]


def pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` preference records in the three shapes preprocessing reads."""
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        q, c, r = rnd.choice(QUESTIONS), rnd.choice(GOOD), rnd.choice(BAD)
        shape = i % 3
        if shape == 0:
            rows.append({"question": q, "response_chosen": c, "response_rejected": r})
        elif shape == 1:
            rows.append(
                {"conversations": [{"from": "human", "value": q}], "chosen": c, "rejected": r}
            )
        else:
            rows.append({"prompt": q, "chosen": c, "rejected": r})
    return rows


def prepare(out: Path, tok: Path, *, n: int = 48, pack: bool = False, seq_length: int = 128):
    """Preprocess ``n`` pairs with ``launch/preprocess.py``'s library call; the prefix."""
    from sfmed.config.data import PreprocessConfig
    from sfmed.data.preprocess import preprocess

    out.mkdir(parents=True, exist_ok=True)
    src = out / "pairs.jsonl"
    src.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in pairs(n)) + "\n", encoding="utf-8"
    )
    preprocess(
        PreprocessConfig(
            tokenizer=str(tok),
            output_dir=str(out / "data"),
            input=str(src),
            reader="jsonl",
            name="pairs",
            format="preference",
            chat={"seq_length": seq_length, "pack": pack},
        )
    )
    return str(out / "data" / "pairs_preference")


def model_with_tokenizer(model_dir: Path, tok: Path, out: Path) -> Path:
    """A copy of a tiny HF model folder with the tiny tokenizer's files next to it."""
    shutil.copytree(model_dir, out)
    for f in Path(tok).iterdir():
        shutil.copy(f, out / f.name)
    return out


# Settings both engines run with in the tests (launch/dpo.py overrides).
COMMON = [
    "device=cpu",
    "model=tiny",
    "data.num_workers=0",
    "train.precision=fp32",
    "train.global_batch_size=4",
    "train.save_interval=0",
    "optim.lr=1e-3",
    "optim.min_lr=1e-4",
    "optim.clip_grad=1.0",
    "optim.weight_decay=0.0",
    "logging.level=WARNING",
]


def compose_dpo(overrides: list[str]):
    """The typed config ``launch/dpo.py`` gets for ``overrides``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sfmed.config.dpo import register

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="dpo", overrides=overrides)
    return OmegaConf.to_object(cfg)


def engine_cfg(model: Path, prefix: str, run_dir: Path, *overrides: str):
    """An ``engine=hf`` DPO config on CPU in fp32 with the shared test settings."""
    return compose_dpo(
        [
            *COMMON,
            "engine=hf",
            f"hf.model={model}",
            f"data.prefix={prefix}",
            f"ckpt_dir={run_dir}",
            "train.steps=3",
            "train.micro_batch_size=2",
            *overrides,
        ]
    )


def metrics(run_dir: Path) -> list[dict]:
    """The records of ``<run>/metrics.jsonl``."""
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def answer_logps(model, tokens, target) -> tuple[float, int]:
    """(sum of log p of the target tokens, their count) of one sequence, run on its own."""
    ids = torch.as_tensor(tokens, dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    tgt = torch.as_tensor(target[1:], dtype=torch.bool)
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(lp[tgt].sum()), int(tgt.sum())


def stored_pairs(prefix: str) -> list[tuple]:
    """(chosen ids, chosen target mask, rejected ids, rejected mask) of every stored sample, read
    with megatron-core's ``IndexedDataset`` straight from the ``.bin/.idx`` and ``_mask`` files."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ids, mask = IndexedDataset(prefix), IndexedDataset(f"{prefix}_mask")
    out = []
    for s in range(len(ids.document_indices) - 1):
        a, b = ids.document_indices[s], ids.document_indices[s + 1]
        assert b - a == 2
        # copies: the arrays are views of memory maps closed with the datasets
        out.append(tuple(np.array(d[k]) for k in (a, a + 1) for d in (ids, mask)))
    return out


def first_samples(prefix: str, n: int, seed: int = 1234) -> list[int]:
    """The first ``n`` samples of a one-dataset run, recomputed from the documented order: the
    training part is a seeded permutation, drawn in a seeded permutation per epoch."""
    import numpy as np

    from sfmed.data.chat.store import PreferenceDataset

    total = len(PreferenceDataset(prefix))
    assert n <= total
    part = np.random.default_rng([seed, 0, 2**31 - 1]).permutation(total)
    return part[np.random.default_rng([seed, 0, 0]).permutation(total)][:n].tolist()
