"""The suite: two tiny models over small fixture data sets of every kind → every table of the
seed reports, resumable (a re-run generates and judges nothing), with provenance and charts."""

from __future__ import annotations

import json
import shutil

import pytest
from fake_openai_server import FakeOpenAI

from sfmed.config.eval import (
    DecodingConfig,
    EvalConfig,
    HFConfig,
    JudgeConfig,
    SuiteConfig,
    SuiteDataset,
    SuiteModel,
)
from sfmed.eval.suite import run_suite


@pytest.fixture(scope="module")
def two_models(tiny_qwen2_factory, tiny_tokenizer_dir, tmp_path_factory):
    """Two tiny random Qwen2 folders (different weights) with the tiny ChatML tokenizer."""
    out = []
    # model 0 has the shape of test_eval_e2e's tiny model (the factory builds it once)
    shape = dict(
        vocab_size=600,
        num_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=4096,
    )
    for seed in (0, 1):
        src = tiny_qwen2_factory(**shape, **({"seed": seed} if seed else {}))
        dst = tmp_path_factory.mktemp("suite_model") / f"m{seed}"
        shutil.copytree(src, dst)
        for f in tiny_tokenizer_dir.iterdir():
            shutil.copy(f, dst / f.name)
        out.append(dst)
    return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return str(path)


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("suite_data")
    cmt = d / "CMtMedQA_test.json"
    cmt.write_text(
        json.dumps(
            [
                {
                    "instruction": "还需要做什么检查？",
                    "output": "建议查血常规。",
                    "history": [["我发烧三天了", "有咳嗽吗？"]],
                },
                {"instruction": "高血压吃什么药？", "output": "遵医嘱服用降压药。", "history": []},
            ],
            ensure_ascii=False,
        ),
        "utf-8",
    )
    huatuo = _jsonl(
        d / "huatuo26M_test.jsonl",
        [
            {"instruction": f"问题{i}：头痛怎么办？", "output": "注意休息，必要时就医。"}
            for i in range(3)
        ],
    )
    web = d / "medQA.test.txt"
    web.write_text(
        "".join(f"{100 + i}\t1\t内科\t胃痛{i}怎么办\t饮食清淡，按时吃饭。\n" for i in range(2)),
        "utf-8",
    )
    tiku = _jsonl(
        d / "medtiku_terms.jsonl",
        [{"question": "什么是贫血？", "reference": "血红蛋白低于正常值。"}],
    )
    ple = _jsonl(
        d / "ple.jsonl",
        [
            {"question": "正常成人心率", "options": ["40", "60-100", "150", "200"], "answer": "B"},
            {"question": "成人正常体温", "options": ["37℃左右", "40℃", "33℃"], "answer": "A"},
        ],
    )
    cmmlu = d / "anatomy.csv"
    cmmlu.write_text(
        ",Question,A,B,C,D,Answer\n0,咽的分部,咽隐窝,口咽部,鼻咽部,喉咽部,C\n"
        "1,属于右心房的结构是,肉柱,室上嵴,乳头肌,梳状肌,D\n",
        "utf-8",
    )
    dlg = d / "cmb_clin.json"
    dlg.write_text(
        json.dumps(
            [
                {
                    "id": "c0",
                    "case": "男，45岁，胸痛2小时。",
                    "conversation": [
                        {"role": "patient", "content": "胸口痛"},
                        {"role": "doctor", "content": "痛了多久？"},
                    ],
                }
            ],
            ensure_ascii=False,
        ),
        "utf-8",
    )
    drug = d / "drugs.csv"
    drug.write_text("drug,indications\n阿司匹林,发热|头痛\n布洛芬,疼痛\n", "utf-8")
    return [
        SuiteDataset(name="CMtMedQA", kind="qa", data=str(cmt), format="cmtmedqa"),
        SuiteDataset(name="huatuo26M", kind="qa", data=huatuo, format="huatuo26m", group="s"),
        SuiteDataset(name="webMedQA", kind="qa", data=str(web), format="webmedqa", group="s"),
        SuiteDataset(name="medtiku", kind="qa", data=tiku, format="jsonl"),
        SuiteDataset(name="PLE", kind="mcq", data=ple, format="jsonl"),
        SuiteDataset(name="CMMLU", kind="mcq", data=str(cmmlu), format="cmmlu"),
        SuiteDataset(name="CMB-Clin", kind="consultation", data=str(dlg)),
        SuiteDataset(name="drugs", kind="drug", data=str(drug)),
    ]


def _judge(messages, k):
    text = messages[-1]["content"]
    if "主动性" in messages[0]["content"]:
        return '{"主动性": 4, "准确性": 3, "帮助性": 4, "语言质量": 5}'
    return "[[A]]" if k % 3 else "[[B]]" if "回答" in text else "[[C]]"


def _table(md: str, title: str) -> list[list[str]]:
    """The rows of the Markdown table under heading ``## <title>`` (header first)."""
    part = md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    lines = [x for x in part.splitlines() if x.startswith("|") and not x.startswith("|---")]
    return [[c.strip() for c in x.strip("|").split("|")] for x in lines]


def test_suite_tables_provenance_and_resume(two_models, fixture_data, tmp_path):
    out = tmp_path / "report"
    with FakeOpenAI(_judge, max_requests=2000) as srv:
        cfg = EvalConfig(
            output_dir=str(out),
            decoding=DecodingConfig(max_new_tokens=6),
            hf=HFConfig(batch_size=8),
            judge=JudgeConfig(base_url=srv.base_url, model="fake-judge", max_retries=0),
            suite=SuiteConfig(
                name="tiny report",
                ours="ours",
                judge_qa=True,
                models=[
                    SuiteModel(name="ours", model=str(two_models[0])),
                    # the peer answers in another (registered) chat format
                    SuiteModel(name="peer", model=str(two_models[1]), chat_format="plain"),
                ],
                datasets=fixture_data,
            ),
        )
        rep = run_suite(cfg)
        n_requests = len(srv.requests)
        md = (out / "report.md").read_text("utf-8")

        # QA-Rouge / QA-GPT: rows = data sets with the pooled row after its group
        for title in ("QA-Rouge", "QA-GPT"):
            t = _table(md, title)
            assert t[0] == ["数据集", "ours vs peer"]
            assert [r[0] for r in t[1:]] == ["CMtMedQA", "huatuo26M", "webMedQA", "All", "medtiku"]
            for r in t[1:]:
                w, ti, lo = (float(x) for x in r[1].strip("*").split("/"))
                assert w + ti + lo == pytest.approx(1.0, abs=2e-4)
                assert r[1].startswith("**") == (w > lo)  # bold where ours wins
        rows = rep["tables"]["qa_rouge"]["rows"]
        hu, web, pooled = rows[1]["cells"]["peer"], rows[2]["cells"]["peer"], rows[3]
        assert pooled["pooled"] and pooled["cells"]["peer"]["n"] == hu["n"] + web["n"] == 5
        for k in range(3):  # the pooled row is the item-weighted mix of its group's rows
            want = (hu["wtl"][k] * hu["n"] + web["wtl"][k] * web["n"]) / 5
            assert pooled["cells"]["peer"]["wtl"][k] == pytest.approx(want)
        assert rows[0]["cells"]["peer"]["n"] == 3  # CMtMedQA: every assistant turn an item

        # 选择题: rows = All then each benchmark, columns = models
        t = _table(md, "选择题 (accuracy %)")
        assert t[0] == ["数据集", "ours", "peer"] and [r[0] for r in t[1:]] == [
            "All",
            "PLE",
            "CMMLU",
        ]
        mrows = rep["tables"]["mcq"]["rows"]
        for m in ("ours", "peer"):
            correct = sum(r["cells"][m]["correct"] for r in mrows[1:])
            assert mrows[0]["cells"][m]["n"] == 4
            assert mrows[0]["cells"][m]["accuracy"] == pytest.approx(correct / 4)

        # CMB-Clin: models × the four judge criteria; drug table: models × criteria 1/2/3
        t = _table(md, "CMB-Clin: CMB-Clin")
        assert t[0] == ["模型", "主动性", "准确性", "帮助性", "语言质量"]
        assert [r[0] for r in t[1:]] == ["ours", "peer"] and t[1][1:] == [
            "4.00",
            "3.00",
            "4.00",
            "5.00",
        ]
        t = _table(md, "药品适应症: drugs (hit rate %)")
        assert t[0] == ["模型", "标准1", "标准2", "标准3"] and [r[0] for r in t[1:]] == [
            "ours",
            "peer",
        ]

        # one JSON with every number and its provenance
        j = json.loads((out / "report.json").read_text("utf-8"))
        src = j["answers"]["peer"]["huatuo26M"]
        assert src["backend"]["chat_format"] == "plain" and src["decoding"]["max_new_tokens"] == 6
        assert j["answers"]["ours"]["huatuo26M"]["backend"]["chat_format"] == "template"
        assert src["sfmed_version"] and len(src["sha256_16"]) == 16
        assert j["mcq_prompt"]["preset"] == "sfmed" and j["generated_this_run"]["ours/PLE"] == 2
        # charts: a W/T/L bar per comparison, accuracy bars per benchmark
        for png in (
            "qa_rouge_ours_vs_peer.png",
            "qa_gpt_ours_vs_peer.png",
            "mcq_accuracy.png",
            "cmb_clin_CMB-Clin.png",
            "drug_drugs.png",
        ):
            assert (out / "charts" / png).read_bytes()[:4] == b"\x89PNG"

        # a re-run generates nothing and asks the judge nothing
        gen = out / "generations" / "peer" / "huatuo26M.jsonl"
        before = gen.read_bytes()
        rep2 = run_suite(cfg)
        assert rep2["generated_this_run"] == {} and len(srv.requests) == n_requests
        assert gen.read_bytes() == before
        assert (out / "report.md").read_text("utf-8") == md
        # a pair that lost an answer regenerates only that item
        lines = before.decode().splitlines()
        gen.write_text("\n".join(lines[1:]) + "\n", "utf-8")
        rep3 = run_suite(cfg)
        assert rep3["generated_this_run"] == {"peer/huatuo26M": 1}
        assert gen.read_bytes() == before  # greedy: the same answer comes back, in item order
    # no temporary files left behind
    assert not [p for p in out.rglob(".*tmp*")]


def test_suite_config_errors_reported_together(tmp_path):
    from sfmed.core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        EvalConfig(
            suite=SuiteConfig(
                ours="nobody",
                models=[SuiteModel(name="a"), SuiteModel(name="a", model=str(tmp_path))],
                datasets=[SuiteDataset(name="x/y", kind="essay", data="")],
            )
        )
    msg = str(e.value)
    for part in (
        "unique name",
        "suite.ours='nobody'",
        "kind='essay'",
        "needs data=",
        "suite.models[a] has no model= and no generations",
        "not a Hugging Face model folder",
        "['x/y'] are used as file names",
    ):
        assert part in msg, part


def test_suite_composes_from_yaml():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import REPO
    from sfmed.config.eval import register
    from sfmed.core.errors import ConfigError

    register()
    with initialize_config_dir(str(REPO / "conf" / "eval"), version_base="1.3"):
        dcfg = compose("evaluate", overrides=["suite=sfmed_report"])
    assert dcfg.suite.ours == "SFMed" and dcfg.output_dir == "outputs/eval/sfmed_report"
    assert [d.kind for d in dcfg.suite.datasets].count("mcq") == 5
    # the example paths do not exist here: every model is named in one error
    with pytest.raises(ConfigError, match=r"(?s)SFMed.*HuatuoGPT2.*DISC-MedLLM"):
        OmegaConf.to_object(dcfg)


def test_suite_with_an_openai_compatible_endpoint_and_given_answers(tmp_path):
    """A peer served behind an OpenAI-compatible endpoint, ours from answers made elsewhere."""
    qa = tmp_path / "qa.jsonl"
    _jsonl(qa, [{"question": f"问题{i}", "reference": "低盐饮食"} for i in range(3)])
    ours = tmp_path / "ours.jsonl"
    _jsonl(ours, [{"id": str(i), "output": "低盐饮食"} for i in range(3)])
    with FakeOpenAI(lambda messages, k: "多运动") as srv:
        cfg = EvalConfig(
            output_dir=str(tmp_path / "out"),
            suite=SuiteConfig(
                models=[
                    SuiteModel(name="ours", generations={"qa": str(ours)}),
                    SuiteModel(name="api", model="served", backend="openai", base_url=srv.base_url),
                ],
                datasets=[SuiteDataset(name="qa", kind="qa", data=str(qa), format="jsonl")],
            ),
        )
        rep = run_suite(cfg)
        asked = [r["messages"][-1]["content"] for r in srv.requests]
    assert sorted(asked) == ["问题0", "问题1", "问题2"]  # concurrent requests
    assert rep["tables"]["qa_rouge"]["rows"][0]["cells"]["api"]["wtl"] == [1.0, 0.0, 0.0]
    assert rep["answers"]["api"]["qa"]["backend"]["backend"] == "openai"
    assert rep["answers"]["ours"]["qa"]["made"] == "elsewhere"
    assert "| qa | **1.0/0.0/0.0** |" in (tmp_path / "out" / "report.md").read_text("utf-8")
