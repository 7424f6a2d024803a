"""The ``opencompass`` / ``opencompass_gen`` MCQ presets against OpenCompass's own template strings.

The expected prompts are built here from the templates copied literally out of OpenCompass
(commit a5acc4bba3b658f151617a3b393602110fb7a740, version 0.5.3+):
opencompass/configs/datasets/cmmlu/cmmlu_ppl_8b9c76.py, cmmlu/cmmlu_gen_c13365.py,
ceval/ceval_ppl_578f8d.py and ceval/ceval_gen_5f30c7.py, put together the way OpenCompass does
for a base model (no meta template): FixKRetriever.generate_ice, PromptTemplate (``</E>`` ice
token, ``safe_format``) and LMTemplateParser.parse_template, whose rules ``_oc_join`` restates.
One case per benchmark is also written out in full. The ``sequence`` scoring is checked against a
forward pass of the tiny model over each whole text (OpenCompass's HuggingFaceBaseModel.get_ppl).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_chat_model_fixture  # noqa: F401 (registers the fixture)

from sfmed.config.eval import PROMPT_PRESETS, EvalConfig, HFConfig, MCQConfig, MCQPromptConfig
from sfmed.eval.backends import side_spec
from sfmed.eval.items import Problems
from sfmed.eval.loaders.mcq import load_mcq
from sfmed.eval.prompts import PRESETS, candidates, mcq_text, resolve_prompt
from sfmed.eval.runner import run_evaluation

# CMMLU rows with the stray spaces real CSV cells have: OpenCompass strips nothing.
CMMLU_DEV = (
    ",Question,A,B,C,D,Answer\n"
    "0,属于右心房的结构是,肉柱,室上嵴,乳头肌,梳状肌,D\n"
    "1,咽的分部 ,咽隐窝, 口咽部,鼻咽部,喉咽部,C\n"
)
CMMLU_TEST = ",Question,A,B,C,D,Answer\n0,壁胸膜的分部不包括 , 肋胸膜,肺胸膜,膈胸膜,胸膜顶,B\n"
CEVAL_DEV = (
    "id,question,A,B,C,D,answer,explanation\n"
    "0,成人脊髓下端平,第1腰椎下缘,第2腰椎下缘,第3腰椎下缘,第12胸椎,A,\n"
    "1,心尖位于,左侧第5肋间隙 ,右侧第5肋间隙,左侧第4肋间隙,胸骨左缘,A,\n"
)
CEVAL_VAL = (
    "id,question,A,B,C,D,answer,explanation\n"
    "0,下列哪项不是休克的早期表现,面色苍白,四肢湿冷,血压明显下降,脉搏细速,C,\n"
    "1,急性心肌梗死患者发病后最初数小时内最常见的死亡原因是,心源性休克,心力衰竭,"
    "心室颤动,心脏破裂,C,\n"
)

# --- literal template strings (f-strings evaluated for the subject, as the configs do) -------
_ch_name = "解剖学"  # cmmlu_subject_mapping['anatomy']
# cmmlu_ppl_8b9c76.py / cmmlu_gen_c13365.py, round[0] (HUMAN):
CMMLU_HUMAN = f"以下是关于{_ch_name}的单项选择题，请直接给出正确答案的选项。\n题目：{{question}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}"
CMMLU_PPL_BOT = {answer: f"答案是: {answer}" for answer in ["A", "B", "C", "D"]}  # round[1]
CMMLU_GEN_BOT = "答案是: {answer}"  # cmmlu_gen_c13365.py round[1]
_ch_name = "临床医学"  # ceval_subject_mapping['clinical_medicine'][1]
# ceval_ppl_578f8d.py / ceval_gen_5f30c7.py, round[0] (HUMAN):
CEVAL_HUMAN = f"以下是中国关于{_ch_name}考试的单项选择题，请选出其中的正确答案。\n{{question}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案: "
CEVAL_PPL_BOT = {answer: answer for answer in ["A", "B", "C", "D"]}  # round[1]
CEVAL_GEN_BOT = "{answer}"  # ceval_gen_5f30c7.py round[1]


def _fill(template: str, row: dict) -> str:
    # opencompass.utils.prompt.safe_format: str.replace of each "{key}" in the row's order
    for k, v in row.items():
        template = template.replace(f"{{{k}}}", str(v))
    return template


def _oc_join(items: list[str]) -> str:
    # LMTemplateParser.parse_template without meta template: each later non-empty item is
    # preceded by "\n"; the first item (even an empty one) gets none.
    out, sep = "", ""
    for it in items:
        if it:
            out += sep + it
        sep = "\n"
    return out


def _oc_prompt(human: str, bot, shots: list[dict], row: dict, ppl: bool, label: str = "") -> str:
    """OpenCompass's final string: PPL (label-keyed template: ice_separator = ice_eos = "\\n")
    or gen (begin/round template: both "", the answer field blanked)."""
    sep = "\n" if ppl else ""

    def bot_for(answer: str) -> str:
        return bot[answer] if ppl else _fill(bot, {"answer": answer})

    items: list[str] = []
    for s in shots:  # BaseRetriever.generate_ice
        items += [_fill(human, s), bot_for(s["answer"]), sep]
    items.append(sep)  # ice_eos_token; for 0-shot the whole ice is this one string
    items += [_fill(human, row), bot_for(label) if ppl else _fill(bot, {**row, "answer": ""})]
    return _oc_join(items)


def _rows(csv_text: str, cols: list[str]) -> list[dict]:
    import csv
    import io

    rows = list(csv.reader(io.StringIO(csv_text)))[1:]
    return [dict(zip(cols, r[1:7])) for r in rows]


CM_COLS = ["question", "A", "B", "C", "D", "answer"]


@pytest.fixture
def data(tmp_path):
    files = {}
    for name, text in [
        ("cmmlu_dev/anatomy.csv", CMMLU_DEV),
        ("cmmlu_test/anatomy.csv", CMMLU_TEST),
        ("ceval_dev/clinical_medicine_dev.csv", CEVAL_DEV),
        ("ceval_val/clinical_medicine_val.csv", CEVAL_VAL),
    ]:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, "utf-8")
        files[name.split("/")[0]] = p
    return files


def _load(path, fmt):
    return load_mcq(path, fmt, Problems())


@pytest.mark.parametrize("k", [0, 1, 2])
def test_opencompass_cmmlu_ppl_and_gen_prompts_are_byte_identical(data, k):
    q = _load(data["cmmlu_test"], "cmmlu")[0]
    shots = _load(data["cmmlu_dev"], "cmmlu")[:k]
    row = _rows(CMMLU_TEST, CM_COLS)[0]
    dev = _rows(CMMLU_DEV, CM_COLS)[:k]
    p = resolve_prompt(MCQPromptConfig(preset="opencompass"), "cmmlu")
    cands = candidates(q, p)
    assert [c[0] for c in cands] == ["A", "B", "C", "D"]
    for letter, cont in cands:
        want = _oc_prompt(CMMLU_HUMAN, CMMLU_PPL_BOT, dev, row, ppl=True, label=letter)
        assert mcq_text(q, shots, p) + cont == want
    g = resolve_prompt(MCQPromptConfig(preset="opencompass_gen"), "cmmlu")
    assert mcq_text(q, shots, g) == _oc_prompt(CMMLU_HUMAN, CMMLU_GEN_BOT, dev, row, ppl=False)


@pytest.mark.parametrize("k", [0, 2])
def test_opencompass_ceval_ppl_and_gen_prompts_are_byte_identical(data, k):
    cols = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    q = _load(data["ceval_val"], "ceval")[0]
    shots = _load(data["ceval_dev"], "ceval")[:k]

    def rows(text):
        import csv
        import io

        return [dict(zip(cols, r)) for r in list(csv.reader(io.StringIO(text)))[1:]]

    row, dev = rows(CEVAL_VAL)[0], rows(CEVAL_DEV)[:k]
    p = resolve_prompt(MCQPromptConfig(preset="opencompass"), "ceval")
    for letter, cont in candidates(q, p):
        want = _oc_prompt(CEVAL_HUMAN, CEVAL_PPL_BOT, dev, row, ppl=True, label=letter)
        assert mcq_text(q, shots, p) + cont == want
    g = resolve_prompt(MCQPromptConfig(preset="opencompass_gen"), "ceval")
    assert mcq_text(q, shots, g) == _oc_prompt(CEVAL_HUMAN, CEVAL_GEN_BOT, dev, row, ppl=False)


def test_opencompass_prompts_written_out(data):
    """The same contract without the helper: one CMMLU and one C-Eval case in full (as printed by
    OpenCompass's retriever + LMTemplateParser for a base model)."""
    q = _load(data["cmmlu_test"], "cmmlu")[0]
    shot = _load(data["cmmlu_dev"], "cmmlu")[0]
    p = resolve_prompt(MCQPromptConfig(preset="opencompass"), "cmmlu")
    h = "以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n"
    assert mcq_text(q, [shot], p) + candidates(q, p)[1][1] == (
        h + "题目：属于右心房的结构是\nA. 肉柱\nB. 室上嵴\nC. 乳头肌\nD. 梳状肌\n答案是: D"
        "\n\n\n\n\n"
        + h
        + "题目：壁胸膜的分部不包括 \nA.  肋胸膜\nB. 肺胸膜\nC. 膈胸膜\nD. 胸膜顶\n答案是: B"
    )
    assert mcq_text(q, [], p) + " A" == (
        "\n\n"
        + h
        + "题目：壁胸膜的分部不包括 \nA.  肋胸膜\nB. 肺胸膜\nC. 膈胸膜\nD. 胸膜顶\n答案是: A"
    )
    c = _load(data["ceval_val"], "ceval")[0]
    g = resolve_prompt(MCQPromptConfig(preset="opencompass_gen"), "ceval")
    s = _load(data["ceval_dev"], "ceval")
    hc = "以下是中国关于临床医学考试的单项选择题，请选出其中的正确答案。\n"
    assert mcq_text(c, s, g) == (
        hc
        + "成人脊髓下端平\nA. 第1腰椎下缘\nB. 第2腰椎下缘\nC. 第3腰椎下缘\nD. 第12胸椎\n答案: \nA\n"
        + hc
        + "心尖位于\nA. 左侧第5肋间隙 \nB. 右侧第5肋间隙\nC. 左侧第4肋间隙\nD. 胸骨左缘\n答案: \nA\n"
        + hc
        + "下列哪项不是休克的早期表现\nA. 面色苍白\nB. 四肢湿冷\nC. 血压明显下降\nD. 脉搏细速\n答案: "
    )


def test_presets_are_data_and_feed_the_prompt_raw():
    assert set(PRESETS) == set(PROMPT_PRESETS)
    p = resolve_prompt(MCQPromptConfig(preset="opencompass"), "cmmlu")
    assert p.scoring == "sequence" and p.settings()["scoring"] == "sequence"
    # an override still wins over the preset
    p2 = resolve_prompt(MCQPromptConfig(preset="opencompass", scoring="continuation"), "ceval")
    assert p2.scoring == "continuation" and p2.answer_cue == "答案: "
    for preset in ("opencompass", "opencompass_gen"):
        mcq = MCQConfig(prompt=MCQPromptConfig(preset=preset))
        cfg = EvalConfig(data="d.csv", generations="g.jsonl", mcq=mcq)
        assert side_spec(cfg).chat_format == "plain"
        cfg = EvalConfig(data="d.csv", generations="g.jsonl", mcq=mcq, use_chat_template=True)
        assert side_spec(cfg).chat_format == "template"


def test_scoring_value_is_checked():
    from sfmed.core.errors import ConfigError

    with pytest.raises(ConfigError, match="mcq.prompt.scoring='ppl'"):
        MCQPromptConfig(scoring="ppl")


def test_sequence_scoring_matches_opencompass_get_ppl(tiny_chat_model, data, tmp_path):
    """loglik with the opencompass preset scores each whole prompt + answer as OpenCompass's
    HuggingFaceBaseModel.get_ppl (mean NLL over the text's token count), lowest wins."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = run_evaluation(
        EvalConfig(
            task="mcq",
            data=str(data["ceval_val"]),
            model=str(tiny_chat_model),
            output_dir=str(tmp_path / "out"),
            hf=HFConfig(batch_size=3),  # mixed lengths in one batch: padding must not count
            mcq=MCQConfig(
                mode="loglik",
                shots=1,
                dev_data=str(data["ceval_dev"]),
                prompt=MCQPromptConfig(preset="opencompass"),
            ),
        )
    )
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32).eval()
    assert r["n"] == 2 and r["sources"]["model"]["chat_format"] == "plain"
    lengths = set()
    for rec in r["records"]:
        ppl = {}
        for letter, cont in rec["continuations"].items():
            text = rec["prompt"][-1]["content"] + cont
            ids = tok(text, add_special_tokens=True, return_tensors="pt")["input_ids"]
            lengths.add(ids.shape[1])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].float()
            nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
            ppl[letter] = float(nll) / ids.shape[1]
            assert rec["logprobs"][letter] == pytest.approx(-ppl[letter], abs=2e-5)
        assert rec["extracted"] == [min(ppl, key=ppl.get)]
    assert len(lengths) > 1  # the batches did mix lengths
    assert r["settings"]["prompt"]["scoring"] == "sequence"
