"""SFT and DPO end to end on CPU (CPU emulation, gloo, fp32), the sharded engine's whole path:

tiny Qwen2 with the tiny ChatML tokenizer → ``launch/convert.py to=mcore`` → pretrain a few
steps → ``launch/preprocess.py format=sft`` on a small multi-turn set → ``launch/sft.py`` 20
steps at TP=2×PP=2 (the supervised loss falls clearly; a run resumed from its step-10
checkpoint repeats steps 11-20 bit for bit) → ``launch/preprocess.py format=preference`` →
``launch/dpo.py`` from the SFT run at TP=2×PP=2 (step-0 gate: loss ln 2; the loss falls) →
``launch/convert.py to=hf`` of the DPO run → transformers loads it and ``generate()`` answers
a ChatML prompt.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, _free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]

COMMON = ["device=cpu", "model=tiny", "logging.level=WARNING", "train.save_final=true"]

QA = [
    ("头痛两周了", "有没有发热？", "没有", "建议测血压。"),
    ("孩子咳嗽", "多喝水，观察体温。", "还流鼻涕", "可能是感冒。"),
    ("高血压患者饮食", "低盐低脂饮食。", "能喝酒吗", "戒烟限酒。"),
    ("糖尿病能吃西瓜吗", "少量可以。", "多少算少量", "注意监测血糖。"),
]


def _env() -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _run(cmd: list[str], what: str, nproc: int | None = None) -> None:
    if nproc is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *cmd]  # fmt: skip
    else:
        cmd = [sys.executable, *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=900)
    if p.returncode != 0:
        pytest.fail(f"{what} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")


def _metrics(run) -> dict[int, dict]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in rows if "loss" in r}


def test_convert_pretrain_sft_dpo_tp2pp2_export_generate(tmp_path, tiny_tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfmed.utils.tiny import make_tiny_qwen2

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    hf = make_tiny_qwen2(tmp_path / "hf")
    tok.save_pretrained(hf)  # the tokenizer travels with the checkpoints to the export
    _run([str(REPO / "launch/convert.py"), "to=mcore", f"src={hf}", f"dst={tmp_path / 'mcore'}",
          "progress=false"], "convert to=mcore")  # fmt: skip

    # pretrain a few steps on the conversations' text
    text = "".join(q + a for conv in QA for q, a in zip(conv[::2], conv[1::2], strict=True))
    corpus = str(tmp_path / "cpt_text_document")
    b = IndexedDatasetBuilder(corpus + ".bin", dtype=np.uint16)
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    for _ in range(40):
        b.add_document(torch.tensor(ids), [len(ids)])
    b.finalize(corpus + ".idx")
    cpt = tmp_path / "cpt"
    _run([str(REPO / "launch/pretrain.py"), *COMMON, "parallel.tp=2", f"data.prefix={corpus}",
          "data.seq_length=64", "data.num_workers=0", "data.split=100/0/0",
          f"init_from={tmp_path / 'mcore'}",
          f"ckpt_dir={cpt}", "train.steps=4", "train.global_batch_size=4",
          "train.save_interval=0", "optim.lr=1e-3", "optim.warmup_steps=1"],
         "pretrain", nproc=2)  # fmt: skip

    # a small multi-turn set, through the real SFT preprocessing
    rows = [
        {"conversation": [{"role": r, "content": c}
                          for r, c in zip(["user", "assistant"] * 2, conv, strict=True)]}
        for conv in QA * 6
    ]  # fmt: skip
    raw = tmp_path / "consult.jsonl"
    raw.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    _run([str(REPO / "launch/preprocess.py"), "format=sft", f"input={raw}", "name=consult",
          "reader=jsonl", "render=dialogue", f"tokenizer={tiny_tokenizer_dir}",
          f"output_dir={tmp_path / 'sft_data'}", "chat.seq_length=256"], "preprocess")  # fmt: skip
    prefix = tmp_path / "sft_data" / "consult_sft"
    assert (tmp_path / "sft_data" / "consult_sft.json").is_file()

    sft_args = [str(REPO / "launch/sft.py"), *COMMON, "parallel=tp2pp2", f"data.prefix={prefix}",
                "data.num_workers=1", f"init_from={cpt}", "train.steps=20",
                "train.global_batch_size=4", "train.micro_batch_size=2", "train.save_interval=10",
                "optim.lr=2e-3", "optim.min_lr=2e-4", "optim.warmup_steps=2"]  # fmt: skip
    run = tmp_path / "sft"
    _run([*sft_args, f"ckpt_dir={run}"], "sft", nproc=4)
    m = _metrics(run)
    assert sorted(m) == list(range(1, 21))
    losses = [m[s]["loss"] for s in range(1, 21)]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
    r = m[20]
    assert 0 < r["supervised_fraction"] < r["packing_efficiency"] <= 1
    assert r["mfu"] is None or r["mfu"] >= 0
    sj = json.loads((run / "iter_0000020" / "sfmed.json").read_text())
    assert sj["origin"]["kind"] == "sft" and sj["tp"] == 2 and sj["pp"] == 2

    # resume from the step-10 checkpoint in a fresh folder: steps 11..20 bit for bit
    again = tmp_path / "sft_resumed"
    again.mkdir()
    shutil.copytree(run / "iter_0000010", again / "iter_0000010")
    (again / "latest_checkpointed_iteration.txt").write_text("10")
    shutil.copytree(run / "hf", again / "hf")
    _run([*sft_args, f"ckpt_dir={again}"], "resumed sft", nproc=4)
    m2 = _metrics(again)
    assert [m2[s]["loss"] for s in range(11, 21)] == losses[10:]

    # DPO from the SFT run: preferred = the consultation's answer, rejected = a refusal
    pairs = [{"prompt": conv[0], "chosen": conv[1], "rejected": "不知道。"} for conv in QA * 4]
    raw = tmp_path / "pairs.jsonl"
    raw.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in pairs) + "\n")
    _run([str(REPO / "launch/preprocess.py"), "format=preference", f"input={raw}", "name=pairs",
          "reader=jsonl", f"tokenizer={tiny_tokenizer_dir}", f"output_dir={tmp_path / 'dpo_data'}",
          "chat.seq_length=256"], "preprocess pairs")  # fmt: skip
    dpo = tmp_path / "dpo"
    _run([str(REPO / "launch/dpo.py"), *COMMON, "parallel=tp2pp2", f"init_from={run}",
          f"data.prefix={tmp_path / 'dpo_data' / 'pairs_preference'}", "data.num_workers=0",
          "train.steps=6", "train.global_batch_size=4", "train.micro_batch_size=2",
          "train.save_interval=0", "optim.lr=1e-3", "optim.warmup_steps=1",
          f"ckpt_dir={dpo}"], "dpo", nproc=4)  # fmt: skip
    md = _metrics(dpo)
    assert sorted(md) == list(range(1, 7))
    assert abs(md[1]["loss"] - np.log(2)) <= 1e-5 and md[6]["loss"] < md[1]["loss"]
    dj = json.loads((dpo / "iter_0000006" / "sfmed.json").read_text())
    assert dj["origin"]["kind"] == "dpo" and dj["origin"]["init_from"].startswith(str(run))

    # export the aligned model; transformers loads it and answers a ChatML prompt
    out = tmp_path / "export"
    _run([str(REPO / "launch/convert.py"), "to=hf", f"src={dpo}", f"dst={out}",
          "progress=false"], "convert to=hf")  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out)
    etok = AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": QA[0][0]}]
    prompt = etok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    tail = etok("<|im_start|>assistant\n")["input_ids"]
    assert prompt[0, -len(tail) :].tolist() == tail  # the generation prompt of the template
    gen = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > prompt.shape[1]
    assert isinstance(etok.decode(gen[0, prompt.shape[1] :]), str)
