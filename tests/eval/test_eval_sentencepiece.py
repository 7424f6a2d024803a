"""Log-likelihood scoring with SentencePiece tokenizers (LLaMA-2, Chinese-LLaMA, Baichuan bases).

``A`` encoded on its own is ``▁A``, while after ``答案：`` it is the bare ``A``: the continuation
must be taken from the joint encoding of prompt + answer. The expected values come from one
forward pass over the whole text, the answer's tokens located by character offsets
(``tests/eval/joint.py``), never from the backend's code.
"""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from joint import joint_loglik

from sfmed.config.eval import EvalConfig, HFConfig, MCQConfig, MCQPromptConfig
from sfmed.eval.backends.base import encode_pair
from sfmed.eval.runner import run_evaluation

ITEMS = [
    ("壁胸膜的分部不包括", "肋胸膜", "肺胸膜", "膈胸膜", "胸膜顶", "B"),
    ("属于右心房的结构是", "肉柱", "室上嵴", "乳头肌", "梳状肌", "D"),
    ("咽的分部", "咽隐窝", "口咽部", "鼻咽部", "喉咽部", "C"),
]
CSV = ",Question,A,B,C,D,Answer\n" + "".join(f"{i},{','.join(r)}\n" for i, r in enumerate(ITEMS))


def _tiny_llama(folder, vocab_size: int, tokenizer_files: list) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in tokenizer_files:
        shutil.copy(f, folder / f.name)


@pytest.fixture(scope="module")
def tiny_sp_model(tmp_path_factory):
    """A SentencePiece BPE model trained here on generated medical-exam text + a tiny LLaMA."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    words = [w for r in ITEMS for w in r[:5]] + ["答案", "以下", "选择题", "正确", "ABCD"]
    lines = []
    for _ in range(400):
        q = "".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        letter = rng.choice("ABCD")
        lines.append(f"{q}\nA. {rng.choice(words)}\nB. {rng.choice(words)}\n答案：{letter}")
        lines.append(f"{letter} {q} {letter}. {rng.choice(words)}")
    (d / "corpus.txt").write_text("\n".join(lines), "utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"),
        model_prefix=str(d / "tokenizer"),
        vocab_size=220,
        model_type="bpe",
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    m = d / "model"
    _tiny_llama(m, 220, [d / "tokenizer.model"])
    return m


@pytest.fixture(scope="module")
def llama2_model(shared_dir, tmp_path_factory):
    """A tiny random LLaMA with the real LLaMA-2 SentencePiece tokenizer (32,000 pieces)."""
    tok = shared_dir / "tokenizers" / "llama2-sentencepiece" / "tokenizer.model"
    if not tok.is_file():
        pytest.skip(f"{tok} not present")
    m = tmp_path_factory.mktemp("llama2") / "model"
    _tiny_llama(m, 32000, [tok])
    return m


def _check_against_joint_forward(model_dir, tmp_path, preset: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "anatomy.csv"
    data.write_text(CSV, "utf-8")
    r = run_evaluation(
        EvalConfig(
            task="mcq",
            data=str(data),
            model=str(model_dir),
            use_chat_template=False,
            output_dir=str(tmp_path / preset),
            hf=HFConfig(batch_size=3),
            mcq=MCQConfig(mode="loglik", prompt=MCQPromptConfig(preset=preset)),
        )
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert r["n"] == 3 and r["sources"]["model"]["chat_format"] == "plain"
    for rec in r["records"]:
        ctx = rec["prompt"][-1]["content"]
        for letters, got in rec["logprobs"].items():
            cont = rec["continuations"][letters]
            want = joint_loglik(model, tok, ctx, cont, add_special_tokens=True)
            assert got == pytest.approx(want, abs=2e-4), (letters, cont)
        assert rec["extracted"] == [max(rec["logprobs"], key=rec["logprobs"].get)]
    return tok, r


def test_tiny_sentencepiece_scores_the_token_that_follows_the_prompt(tiny_sp_model, tmp_path):
    tok, r = _check_against_joint_forward(tiny_sp_model, tmp_path, "sfmed")
    ctx = r["records"][0]["prompt"][-1]["content"]
    # the bug this guards against: the letter alone is "▁A", not what follows "答案："
    alone = tok("A", add_special_tokens=False)["input_ids"]
    _, joint = encode_pair(tok, ctx, "A", add_special_tokens=True)
    assert tok.convert_ids_to_tokens(alone)[0].startswith("▁") and joint != alone
    _check_against_joint_forward(tiny_sp_model, tmp_path, "lm_eval")  # " A" continuations


def test_llama2_sentencepiece_scores_match_joint_forward(llama2_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama2_model)
    assert tok("A", add_special_tokens=False)["input_ids"] == [319]  # "▁A"
    _, cont = encode_pair(tok, "答案：", "A", add_special_tokens=True)
    assert cont == [29909]  # the bare "A" that follows "答案："
    # lm-eval's form: a space before the letter, and trailing context whitespace moves over
    assert encode_pair(tok, "答案： ", "A", True)[1] == encode_pair(tok, "答案：", " A", True)[1]
    _check_against_joint_forward(llama2_model, tmp_path, "sfmed")
    _check_against_joint_forward(llama2_model, tmp_path, "lm_eval")
