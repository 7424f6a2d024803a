"""End to end with the transformers backend on a tiny random Qwen2 (scores meaningless, pipeline
real): MCQ generate + log-likelihood, ROUGE pairwise, reference metrics, the Hydra entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from joint import joint_loglik

from conftest import REPO
from sfmed.config.eval import DecodingConfig, EvalConfig, HFConfig, MCQConfig
from sfmed.eval.runner import run_evaluation

CMMLU = ",Question,A,B,C,D,Answer\n" + "".join(
    f"{i},{q},{a},{b},{c},{d},{ans}\n"
    for i, (q, a, b, c, d, ans) in enumerate(
        [
            ("壁胸膜的分部不包括", "肋胸膜", "肺胸膜", "膈胸膜", "胸膜顶", "B"),
            ("属于右心房的结构是", "肉柱", "室上嵴", "乳头肌", "梳状肌", "D"),
            ("咽的分部", "咽隐窝", "口咽部", "鼻咽部", "喉咽部", "C"),
        ]
    )
)


@pytest.fixture(scope="module")
def tiny_model(tiny_qwen2_factory, tiny_tokenizer_dir, tmp_path_factory):
    """Tiny random Qwen2 (vocab 600) with the tiny ChatML tokenizer copied in."""
    src = tiny_qwen2_factory(
        vocab_size=600,
        num_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=4096,
    )
    dst = tmp_path_factory.mktemp("eval_model") / "tiny"
    shutil.copytree(src, dst)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def mcq_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmmlu")
    for name in ("anatomy", "virology"):
        (d / "test").mkdir(exist_ok=True)
        (d / "dev").mkdir(exist_ok=True)
        (d / "test" / f"{name}.csv").write_text(CMMLU, "utf-8")
        (d / "dev" / f"{name}.csv").write_text(CMMLU.replace("壁胸膜", "脏胸膜"), "utf-8")
    return d


def _cfg(model, out, **kw):
    base = dict(
        model=str(model),
        output_dir=str(out),
        hf=HFConfig(batch_size=4),
        decoding=DecodingConfig(max_new_tokens=12),
    )
    return EvalConfig(**{**base, **kw})


def test_mcq_generate_records_rescoring_and_determinism(tiny_model, mcq_dir, tmp_path):
    cfg = _cfg(
        tiny_model,
        tmp_path / "o",
        task="mcq",
        data=str(mcq_dir / "test"),
        format="cmmlu",
        mcq=MCQConfig(shots=1, dev_data=str(mcq_dir / "dev")),
    )
    r = run_evaluation(cfg)
    assert r["n"] == 6 and 0.0 <= r["accuracy"] <= 1.0
    assert set(r["by_subject"]) == {"anatomy", "virology"} and r["decoding"]["max_new_tokens"] == 12
    rec = r["records"][0]
    assert rec["id"] == "anatomy/0" and rec["answer"] == ["B"] and rec["score"] in (0, 1)
    assert "答案：B" not in rec["prompt"][-1]["content"].split("\n\n")[-1]  # the question itself
    assert "脏胸膜" in rec["prompt"][-1]["content"]  # one dev example of the same subject
    assert rec["output"] and "rule" in rec
    out = tmp_path / "o"
    first = (out / "mcq.json").read_bytes()
    with pytest.raises(Exception, match="exists and is not empty"):
        run_evaluation(cfg)
    cfg.overwrite = True
    run_evaluation(cfg)
    assert (out / "mcq.json").read_bytes() == first  # same inputs → same file
    # the generations it wrote score the same without a model
    gens = out / "mcq.generations.jsonl"
    assert [json.loads(x)["id"] for x in gens.read_text("utf-8").splitlines()][:2] == [
        "anatomy/0",
        "anatomy/1",
    ]
    r2 = run_evaluation(
        EvalConfig(
            task="mcq",
            data=str(mcq_dir / "test"),
            generations=str(gens),
            output_dir=str(tmp_path / "re"),
            mcq=MCQConfig(shots=1, dev_data=str(mcq_dir / "dev")),
        )
    )
    assert r2["accuracy"] == r["accuracy"] and r2["sources"]["model"] == {"generations": str(gens)}


def test_mcq_loglik_matches_unbatched_forward(tiny_model, mcq_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = run_evaluation(
        _cfg(
            tiny_model,
            tmp_path,
            task="mcq",
            data=str(mcq_dir / "test" / "anatomy.csv"),
            mcq=MCQConfig(mode="loglik"),
        )
    )
    assert r["n"] == 3 and r["n_unparsed"] == 0
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for rec in r["records"]:
        ctx = tok.apply_chat_template(rec["prompt"], tokenize=False, add_generation_prompt=True)
        for letter, got in rec["logprobs"].items():
            # the letter as it follows the prompt in one joint text (not encoded on its own)
            want = joint_loglik(model, tok, ctx, letter, add_special_tokens=False)
            assert got == pytest.approx(want, abs=2e-4)
        assert rec["extracted"] == [max(rec["logprobs"], key=rec["logprobs"].get)]


def test_rouge_pairwise_and_reference_metrics(tiny_model, tmp_path):
    rows = [
        {
            "question": f"问：高血压患者{i}饮食注意什么？",
            "reference": "低盐低脂饮食，戒烟限酒，规律运动。",
        }
        for i in range(5)
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows), "utf-8")
    gb = tmp_path / "peer.jsonl"
    gb.write_text(
        "".join(
            json.dumps({"id": str(i), "output": "低盐饮食" if i % 2 else ""}, ensure_ascii=False)
            + "\n"
            for i in range(5)
        ),
        "utf-8",
    )
    sampled = DecodingConfig(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    cfg = _cfg(
        tiny_model,
        tmp_path / "p",
        task="rouge_pairwise",
        data=str(data),
        generations_b=str(gb),
        decoding=sampled,
    )
    r = run_evaluation(cfg)
    assert r["n"] == 5 and r["win"] + r["tie"] + r["lose"] == pytest.approx(1.0)
    for rec in r["records"]:
        want = (
            "win"
            if rec["rouge_l_a"] > rec["rouge_l_b"]
            else "lose"
            if rec["rouge_l_a"] < rec["rouge_l_b"]
            else "tie"
        )
        assert rec["outcome"] == want
    assert r["decoding"]["temperature"] == 0.9 and r["sources"]["a"]["chat_template"] is True
    first = (tmp_path / "p" / "rouge_pairwise.json").read_bytes()
    cfg.overwrite = True
    run_evaluation(cfg)
    assert (tmp_path / "p" / "rouge_pairwise.json").read_bytes() == first  # seeded sampling repeats
    assert (tmp_path / "p" / "rouge_pairwise.png").read_bytes()[:4] == b"\x89PNG"
    m = run_evaluation(
        EvalConfig(
            task="reference_metrics",
            data=str(data),
            generations=str(gb),
            output_dir=str(tmp_path / "m"),
            strict=True,
        )
    )
    # "低盐饮食" vs the reference: every character matches, 4 of its 17 characters are hit
    assert m["records"][1]["rouge1"] == pytest.approx(8 / 21)
    assert m["records"][0]["rouge1"] == 0.0 and 0 < m["bleu1"] < 1
    assert "ROUGE-L" in (tmp_path / "m" / "reference_metrics.md").read_text("utf-8")


def test_launch_entry_point(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(
        json.dumps({"question": "q", "reference": "低盐饮食"}, ensure_ascii=False) + "\n", "utf-8"
    )
    ga, gb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ga.write_text(json.dumps({"id": "0", "output": "低盐饮食"}, ensure_ascii=False) + "\n", "utf-8")
    gb.write_text(json.dumps({"id": "0", "output": "多运动"}, ensure_ascii=False) + "\n", "utf-8")
    cmd = [
        sys.executable,
        str(REPO / "launch" / "evaluate.py"),
        "task=rouge_pairwise",
        f"data={data}",
        f"generations_a={ga}",
        f"generations_b={gb}",
        f"output_dir={tmp_path / 'out'}",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "| qa | 1.0/0.0/0.0 |" in p.stdout
    assert json.loads((tmp_path / "out" / "rouge_pairwise.json").read_text("utf-8"))["win"] == 1.0
    p = subprocess.run(
        [*cmd[:2], "task=mcq", f"data={data}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert p.returncode == 2 and "needs model=<hf folder> or generations=" in p.stderr


@pytest.mark.gpu
def test_hf_backend_on_gpu_matches_cpu(tiny_model, mcq_dir, tmp_path):
    data = str(mcq_dir / "test" / "anatomy.csv")
    runs = {}
    for dev in ("cpu", "cuda"):
        hf = HFConfig(batch_size=2, device=dev, dtype="float32")
        runs[dev] = run_evaluation(
            _cfg(
                tiny_model,
                tmp_path / dev,
                task="mcq",
                data=data,
                hf=hf,
                mcq=MCQConfig(mode="loglik"),
            )
        )
    for a, b in zip(runs["cpu"]["records"], runs["cuda"]["records"]):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-3)
