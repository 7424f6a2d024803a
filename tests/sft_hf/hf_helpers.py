"""Helpers of the HF-engine tests: a small multi-turn SFT set, engine configs, and reference
losses computed one conversation at a time with plain transformers (no TRL, no packing)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

QUESTIONS = ["头痛两周了", "糖尿病能吃西瓜吗", "孩子咳嗽", "还流鼻涕", "要吃药吗", "高血压饮食"]
ANSWERS = [
    "有没有发热？",
    "少量可以，注意监测血糖。",
    "多喝水，观察体温。",
    "可能是感冒。",
    "对症用药。",
    "低盐低脂饮食，戒烟限酒。",
]


def conversations(n: int, seed: int = 0) -> list[dict]:
    """``n`` DISC-Med-style records of 1-3 user/assistant exchanges."""
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        conv = []
        for _ in range(rnd.randint(1, 3)):
            conv.append({"role": "user", "content": rnd.choice(QUESTIONS)})
            conv.append({"role": "assistant", "content": rnd.choice(ANSWERS)})
        rows.append({"conversation": conv})
    return rows


def prepare(out: Path, tok: Path, *, pack: bool, seq_length: int = 256, n: int = 48) -> str:
    """Preprocess ``n`` conversations with ``launch/preprocess.py``'s library call; the prefix."""
    from sfmed.config.data import PreprocessConfig
    from sfmed.data.preprocess import preprocess

    out.mkdir(parents=True, exist_ok=True)
    src = out / "chats.jsonl"
    src.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in conversations(n)) + "\n",
        encoding="utf-8",
    )
    preprocess(
        PreprocessConfig(
            tokenizer=str(tok),
            output_dir=str(out / "data"),
            input=str(src),
            reader="jsonl",
            render="dialogue",
            name="chats",
            format="sft",
            chat={"seq_length": seq_length, "pack": pack},
        )
    )
    return str(out / "data" / "chats_sft")


def model_with_tokenizer(model_dir: Path, tok: Path, out: Path) -> Path:
    """A copy of a tiny HF model folder with the tiny tokenizer's files next to it."""
    shutil.copytree(model_dir, out)
    for f in Path(tok).iterdir():
        shutil.copy(f, out / f.name)
    return out


REPO = Path(__file__).resolve().parents[2]

# Settings both engines run with in the tests (launch/sft.py overrides).
COMMON = [
    "device=cpu",
    "model=tiny",
    "data.num_workers=0",
    "train.precision=fp32",
    "train.global_batch_size=4",
    "train.save_interval=0",
    "optim.lr=1e-3",
    "optim.min_lr=1e-4",
    "optim.warmup_steps=2",
    "optim.clip_grad=1.0",
    "logging.level=WARNING",
]


def compose_sft(overrides: list[str]):
    """The typed config ``launch/sft.py`` gets for ``overrides``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sfmed.config.sft import register

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="sft", overrides=overrides)
    return OmegaConf.to_object(cfg)


def engine_cfg(model: Path, prefix: str, run_dir: Path, *overrides: str):
    """An ``engine=hf`` config on CPU in fp32 with the shared test settings."""
    return compose_sft(
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


def conversation_pieces(prefix: str, sample: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, target mask) of every conversation of a sample, read with megatron-core's
    ``IndexedDataset`` straight from the ``.bin/.idx`` and ``_mask`` files."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ids, mask = IndexedDataset(prefix), IndexedDataset(f"{prefix}_mask")
    a, b = ids.document_indices[sample], ids.document_indices[sample + 1]
    return [(np.asarray(ids[k], np.int64), np.asarray(mask[k], np.int64)) for k in range(a, b)]


def reference_loss_and_grad(model, prefix: str, samples: list[int]):
    """The global-batch loss of ``samples`` (sum of the CE of every supervised target over
    their count) and the norm of its gradient, each conversation run on its own."""
    model.zero_grad()
    total, count = 0.0, 0
    pieces = [p for s in samples for p in conversation_pieces(prefix, s)]
    n = sum(int(m[1:].sum()) for _, m in pieces)
    for ids, mask in pieces:
        logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0].float()
        tgt = torch.as_tensor(mask[1:]) > 0
        ce = torch.nn.functional.cross_entropy(
            logits[:-1][tgt], torch.as_tensor(ids[1:])[tgt], reduction="sum"
        )
        (ce / n).backward()
        total += ce.item()
        count += int(tgt.sum())
    assert count == n
    norm = torch.sqrt(
        sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)
    )
    return total / count, float(norm), count


def free_port() -> int:
    """A free TCP port on localhost (torchrun's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_samples(prefix: str, n: int, seed: int = 1234) -> list[int]:
    """The first ``n`` samples of a one-dataset run, recomputed from the documented order: the
    training part is a seeded permutation, drawn in a seeded permutation per epoch."""
    from sfmed.data.chat.store import SFTDataset

    total = len(SFTDataset(prefix))
    assert n <= total
    part = np.random.default_rng([seed, 0, 2**31 - 1]).permutation(total)
    return part[np.random.default_rng([seed, 0, 0]).permutation(total)][:n].tolist()


def sample_stream(model: Path, prefix: str, n: int):
    """The sharded engine's training samples of a one-dataset run (``SFTSamples``)."""
    from sfmed.recipes.sft import SFTSamples, resolve_data, split_parts

    cfg = engine_cfg(model, prefix, Path("unused"))
    data = resolve_data(cfg)
    parts, _ = split_parts(data, cfg.data.split_weights, cfg.train.seed)
    return SFTSamples(data, parts, n, cfg.train.seed)
