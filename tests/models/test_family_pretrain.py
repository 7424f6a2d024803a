"""Each family's tiny preset through the training stages at TP=2×PP=2 (CPU emulation).

Pretraining runs a few steps on each family's tiny preset (random init), and at TP=4 on a model
with 2 KV heads (TP larger than the KV-head count); the loss falls on a repetitive corpus and the
final checkpoint is complete. The pretrained LLaMA, Baichuan (ALiBi + NormHead) and Qwen3
checkpoints then go on through the chat stages with a tokenizer of the family's kind built on the
spot (SentencePiece for LLaMA and Baichuan, Baichuan's with its reserved user/assistant ids
195/196; byte-level BPE with ChatML for Qwen3) and the family's chat format:

* ``launch/preprocess.py format=sft`` on a small multi-turn set: the supervised targets stored
  are exactly the answer tokens and their end-of-turn token, checked against ids and masks
  built here from the format's reference code with ``sentencepiece`` / ``transformers`` alone;
* ``launch/sft.py`` from the pretrained checkpoint: the supervised loss falls;
* LLaMA and Baichuan: ``launch/preprocess.py format=preference`` and ``launch/dpo.py`` from the
  SFT checkpoint: at step 1 the policy equals the reference, so the loss is ln 2 (within 1e-5)
  and the reward margin 0; the loss then falls.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 8
RUNS = {
    "tiny_llama": ["model=tiny_llama", "parallel=tp2pp2"],
    "tiny_qwen3": ["model=tiny_qwen3", "parallel=tp2pp2"],
    "tiny_baichuan": ["model=tiny_baichuan", "parallel=tp2pp2"],  # ALiBi + NormHead
    "tiny_tp4": ["model=tiny", "parallel.tp=4"],  # 8 heads, 2 KV heads
}
CHAT = {"tiny_llama": "llama2", "tiny_baichuan": "baichuan", "tiny_qwen3": "chatml"}
"""The chat format each family's chat stages run with."""
DPO = ("tiny_llama", "tiny_baichuan")
"""Families that go on to DPO (Qwen3's ChatML DPO is Qwen2's, tested in tests/dpo_train)."""

# (user, answer, user, answer): a small consultation set a tiny model learns within a few steps
QA = [
    ("头痛两周了", "有没有发热？", "没有", "建议测血压。"),
    ("孩子咳嗽", "多喝水，观察体温。", "还流鼻涕", "可能是感冒。"),
    ("高血压患者饮食", "低盐低脂饮食。", "能喝酒吗", "戒烟限酒。"),
    ("糖尿病能吃西瓜吗", "少量可以。", "多少算少量", "注意监测血糖。"),
    ("失眠怎么办", "睡前不要喝咖啡。", "可以吃药吗", "请遵医嘱。"),
    ("胃痛三天", "饮食清淡。", "还恶心", "建议去医院。"),
]
PAIRS = [
    (f"{s}{d}怎么办", good, bad)
    for s in ("头痛", "发热", "咳嗽", "腹泻")
    for d, good, bad in (("两天", "去看医生。", "不用管。"), ("一周", "请去医院。", "忍一忍。"))
]
SFT_STEPS, DPO_STEPS = 12, 3
CHAT_SEQ = {"llama2": 64, "baichuan": 64, "chatml": 128}  # ChatML adds a system turn


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("corpus")
    prefix = str(root / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    patterns = [rng.integers(3, 999, size=int(rng.integers(5, 12))) for _ in range(4)]
    for i in range(200):
        doc = np.concatenate([np.tile(patterns[i % 4], 6), [999]])
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _run(args: list[str], what: str, nproc: int | None = None) -> None:
    if nproc is None:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_port()}", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO)
    assert proc.returncode == 0, f"{what}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _losses(run_dir: Path) -> dict[int, dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_family_preset_trains(corpus, tmp_path, run):
    out = tmp_path / run
    _run([
        str(REPO / "launch/pretrain.py"),
        "device=cpu", *RUNS[run], f"data.prefix={corpus}", "data.seq_length=32",
        "data.num_workers=0", f"train.steps={STEPS}", "train.global_batch_size=8",
        "train.micro_batch_size=2", f"train.save_interval={STEPS}", "optim.lr=1e-2",
        "optim.min_lr=1e-3", "optim.warmup_steps=1", "logging.level=WARNING", f"ckpt_dir={out}",
    ], "pretrain", nproc=4)  # fmt: skip
    m = _losses(out)
    losses = [m[s]["loss"] for s in sorted(m)]
    assert len(losses) == STEPS and all(np.isfinite(losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    if run == "tiny_baichuan":
        _export_keeps_the_trained_logits(out, tmp_path / "hf")
    if run in CHAT:
        _chat_stages(run, CHAT[run], out, tmp_path)


def _export_keeps_the_trained_logits(run_dir: Path, hf: Path) -> None:
    """NormHead + ALiBi after training: the exported folder (raw output rows, normalised at run
    time by the hub code, here by the reference forward) gives the trained model's logits."""
    from baichuan_reference import baichuan_logits

    from sfmed.convert import convert_mcore_to_hf
    from sfmed.convert.verify import make_tokens, run_mcore_logits

    convert_mcore_to_hf(run_dir, hf, progress=False)
    tokens = make_tokens(1000, 2, 16, seed=2)
    trained = run_mcore_logits(run_dir, tokens, tp=2, pp=2, device="cpu")
    ref = baichuan_logits(hf, tokens)
    assert (trained - ref).abs().max().item() <= 1e-4
    assert torch.equal(trained.argmax(-1), ref.argmax(-1))


# -- the chat stages -------------------------------------------------------------------------------


def _tokenizer(fmt: str, out: Path) -> Path:
    """A tokenizer of the family's kind, trained here on the chat text (no download)."""
    from sfmed.utils.tiny import make_tiny_sentencepiece, make_tiny_tokenizer

    text = "\n".join(" ".join(c) for c in QA) + "\n" + "\n".join(" ".join(p) for p in PAIRS)
    if fmt == "chatml":
        return make_tiny_tokenizer(out, corpus=text + "\nuser assistant system\n")
    # Baichuan's vocabulary reserves ids 3..: 195/196 are its user/assistant tokens.
    reserved = 194 if fmt == "baichuan" else 0
    return make_tiny_sentencepiece(out, reserved=reserved, corpus=text + "\n[INST] [/INST]\n")


class _Reference:
    """Ids and target masks of a conversation as each format's reference code builds them,
    with the tokenizer library alone (``sentencepiece`` / ``transformers``), not sfmed."""

    def __init__(self, fmt: str, tok: Path):
        self.fmt = fmt
        if fmt == "chatml":
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(tok)
        else:
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))
            assert self.sp.eos_id() == 2 and self.sp.bos_id() == 1

    def _sp_span(self, text: str, start: int) -> tuple[list[int], list[int]]:
        """``sp.encode(text)`` and 1 for the tokens holding a character at or after ``start``."""
        cut = len(text[:start].encode("utf-8"))
        pieces = self.sp.encode(text, return_type="proto").pieces
        return [p.id for p in pieces], [int(p.end > cut) for p in pieces]

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """(ids, mask): mask 1 on the answers' tokens and their end-of-turn token only."""
        ids: list[int] = []
        mask: list[int] = []
        if self.fmt == "llama2":  # Meta's Llama.chat_completion, per exchange
            for (_, u), (_, a) in zip(turns[::2], turns[1::2], strict=True):
                head = f"[INST] {u.strip()} [/INST]"
                i, m = self._sp_span(f"{head} {a.strip()} ", len(head))
                ids += [1, *i, 2]
                mask += [0, *m, 1]
        elif self.fmt == "baichuan":  # Baichuan-13B-Chat's _build_chat_input
            for (_, u), (_, a) in zip(turns[::2], turns[1::2], strict=True):
                q, ans = self.sp.encode(u), self.sp.encode(a)
                ids += [195, *q, 196, *ans, 2]
                mask += [0] * (len(q) + 2) + [1] * (len(ans) + 1)
        else:  # ChatML with the default system turn; ids checked against apply_chat_template
            start, end = (self.hf.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
            nl = self.hf("\n", add_special_tokens=False)["input_ids"]
            for role, content in [("system", "You are a helpful assistant."), *turns]:
                enc = self.hf(f"{role}\n{content}", add_special_tokens=False,
                              return_offsets_mapping=True)  # fmt: skip
                train = role == "assistant"
                ids += [start, *enc["input_ids"], end, *nl]
                body = [int(train and e > len(role) + 1) for _, e in enc["offset_mapping"]]
                mask += [0, *body, int(train), *[0] * len(nl)]
            msgs = [{"role": r, "content": c} for r, c in turns]
            want = self.hf.apply_chat_template(msgs, tokenize=True)
            want = want["input_ids"] if hasattr(want, "keys") else want
            assert ids == list(want)
        return ids, mask


def _check_sft_targets(prefix: Path, ref: _Reference) -> None:
    """Every stored conversation is one of QA, and what the trainer supervises (the shifted
    loss mask) is exactly the next token where the reference marks an answer token."""
    from sfmed.data.chat.store import SFTDataset

    expected = {}
    for conv in QA:
        ids, mask = ref.conversation(list(zip(["user", "assistant"] * 2, conv, strict=True)))
        assert 0 < sum(mask) < len(mask)
        expected[tuple(ids)] = mask
    ds = SFTDataset(prefix)
    seen = []
    for i in range(len(ds)):
        s = ds[i]
        cu = s["cu_seqlens"]
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            ids = tuple(int(x) for x in s["tokens"][a:b])
            assert ids in expected, f"a stored conversation matches no reference encoding: {ids}"
            want = expected[ids]
            assert s["loss_mask"][a : b - 1].tolist() == want[1:] and s["loss_mask"][b - 1] == 0
            seen.append(ids)
    assert sorted(seen) == sorted(list(expected) * 4)  # every record kept, whole


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _chat_stages(run: str, fmt: str, pretrained: Path, tmp: Path) -> None:
    tok = _tokenizer(fmt, tmp / "tok")
    ref = _Reference(fmt, tok)
    conversations = [
        {"conversation": [{"role": r, "content": c}
                          for r, c in zip(["user", "assistant"] * 2, conv, strict=True)]}
        for conv in QA * 4
    ]  # fmt: skip
    data = tmp / "chat_data"
    prep = [str(REPO / "launch/preprocess.py"), "reader=jsonl", f"tokenizer={tok}",
            f"output_dir={data}", f"chat.seq_length={CHAT_SEQ[fmt]}", f"chat.template={fmt}"]  # fmt: skip
    _run([*prep, "format=sft", f"input={_jsonl(tmp / 'consult.jsonl', conversations)}",
          "name=consult", "render=dialogue"], f"{run}: preprocess format=sft")  # fmt: skip
    _check_sft_targets(data / "consult_sft", ref)

    common = ["device=cpu", *RUNS[run], "logging.level=WARNING", "data.num_workers=0",
              "train.global_batch_size=4", "train.micro_batch_size=2", "train.save_interval=0",
              "train.save_final=true", "optim.warmup_steps=1"]  # fmt: skip
    sft = tmp / "sft"
    _run([str(REPO / "launch/sft.py"), *common, f"data.prefix={data / 'consult_sft'}",
          f"init_from={pretrained}", f"train.steps={SFT_STEPS}", "optim.lr=5e-3",
          "optim.min_lr=5e-4", f"ckpt_dir={sft}"], f"{run}: sft", nproc=4)  # fmt: skip
    m = _losses(sft)
    assert sorted(m) == list(range(1, SFT_STEPS + 1))
    losses = [m[s]["loss"] for s in sorted(m)]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    sj = json.loads((sft / f"iter_{SFT_STEPS:07d}" / "sfmed.json").read_text())
    assert sj["origin"]["kind"] == "sft" and (sj["tp"], sj["pp"]) == (2, 2)

    if run not in DPO:
        return
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    _run([*prep, "format=preference", f"input={_jsonl(tmp / 'pairs.jsonl', pairs)}",
          "name=pairs"], f"{run}: preprocess format=preference")  # fmt: skip
    dpo = tmp / "dpo"
    _run([str(REPO / "launch/dpo.py"), *common, f"data.prefix={data / 'pairs_preference'}",
          f"init_from={sft}", f"train.steps={DPO_STEPS}", "optim.lr=1e-3", "optim.min_lr=1e-4",
          "train.save_final=false", f"ckpt_dir={dpo}"], f"{run}: dpo", nproc=4)  # fmt: skip
    d = _losses(dpo)
    assert sorted(d) == list(range(1, DPO_STEPS + 1))
    assert abs(d[1]["loss"] - math.log(2)) <= 1e-5, d[1]  # policy = reference at step 1
    assert abs(d[1]["rewards/margins"]) <= 1e-5, d[1]
    assert d[1]["logps/chosen"] < 0 and d[1]["logps/rejected"] < 0
    assert all(np.isfinite(d[s]["loss"]) for s in d)
    assert d[DPO_STEPS]["loss"] < d[1]["loss"], d  # the preference is being learnt
