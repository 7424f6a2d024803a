"""Every corpus YAML and blend YAML against its schema; config validation; cleaning."""

from __future__ import annotations

import pytest

from conftest import REPO
from sfmed.config.data import PreprocessConfig, SourceConfig
from sfmed.core.errors import ConfigError
from sfmed.data.clean import make_cleaner, normalize_whitespace, strip_html
from sfmed.data.render import make_renderer

SOURCES = sorted(p.stem for p in (REPO / "conf/sources").glob("*.yaml"))
SEED = {
    "cmtmedqa",
    "chatmed_consult",
    "disc_med_sft",
    "meddialog",
    "promptcblue",
    "shennong_tcm",
    "cmedqa2",
    "huatuo_knowledge_graph",
    "huatuo_encyclopedia",
    "huatuo_sft",
    "webmedqa",
    "chinese_medical_dialogue",
    "cmexam",
    "cmb_exam",
    "textbooks",
    "yiigle_abstracts",
    "baike2018qa",
    "webtext2019zh",
    "wiki2019zh",
}


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sfmed.config.data import register

    register()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("preprocess", overrides=overrides)
    return OmegaConf.to_object(cfg)


def test_every_source_yaml_validates_and_renders_its_example():
    assert set(SOURCES) >= SEED, SEED - set(SOURCES)
    cfg = _compose([f"sources=[{','.join(SOURCES)}]", "tokenizer=t", "output_dir=o"])
    assert isinstance(cfg, PreprocessConfig) and list(cfg.sources) == SOURCES
    for name, src in cfg.sources.items():
        assert isinstance(src, SourceConfig) and src.files and src.description, name
        assert src.group in ("medical", "general"), name
        assert src.example is not None, f"{name}: add an example record"
        text = make_renderer(src)(src.example)
        assert isinstance(text, str) and len(text) >= 10, (name, text)


def test_blend_yamls_compose_into_the_pretrain_data_schema():
    blends = sorted(p.stem for p in (REPO / "conf/blend").glob("*.yaml"))
    assert blends
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sfmed.config.pretrain_data import PretrainDataConfig

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        for b in blends:
            cfg = compose(f"blend/{b}")
            data = OmegaConf.merge(OmegaConf.structured(PretrainDataConfig), cfg["data"])
            entries = OmegaConf.to_container(data.blend)
            assert entries and all("prefix" in e for e in entries), b
            kinds = {k for e in entries for k in ("weight", "tokens") if k in e}
            assert len(kinds) <= 1, b
            assert kinds or data.groups, b


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"dedup": "fuzzy"}, "dedup='fuzzy'"),
        ({"reader": "xml"}, "reader='xml'"),
        ({"encoding": "klingon"}, "encoding='klingon'"),
        ({"render": "template"}, "needs template"),
        ({"reader": "text", "render": "mcq"}, "render=field"),
        ({"workers": -1}, "workers=-1"),
        ({"input": None}, "nothing to do"),
        ({"input": None, "text_field": "content"}, "only apply to an ad-hoc input"),
        ({"tokenizer": "???"}, "tokenizer is not set"),
    ],
)
def test_bad_values_fail_with_the_value_named(kw, match):
    base = {"tokenizer": "t", "output_dir": "o", "input": "x.jsonl"}
    with pytest.raises(ConfigError, match=match):
        PreprocessConfig(**(base | kw))


def test_bad_source_value_names_the_source():
    with pytest.raises(ConfigError, match=r"sources\.a\.render='qa'"):
        PreprocessConfig(
            tokenizer="t", output_dir="o", sources={"a": {"files": ["x"], "render": "qa"}}
        )


def test_cleaning_steps():
    assert (
        strip_html("<p>盐酸二甲双胍片</p><p>用于2型糖尿病&nbsp;患者</p>")
        == "\n盐酸二甲双胍片\n\n用于2型糖尿病\xa0患者\n"
    )
    kept = "血压<140/90 mmHg，心率>60次，a<b 且 c>d"
    assert strip_html(kept) == kept
    assert strip_html("x<script>alert(1)</script><!-- c --><span style='a'>y</span>") == "xy"
    assert (
        normalize_whitespace("  第一行 \t 内容 \r\n\r\n\r\n\u3000\u3000第二行\u200b\x07  ")
        == "第一行 内容\n\n第二行"
    )
    clean = make_cleaner("NFC", True, True, min_chars=5, max_chars=20)
    assert clean("e\u0301 <br/>是药五个字") == ("\u00e9\n是药五个字", None)
    assert clean(" \n ")[1] == "empty"
    assert clean("短")[1] == "too_short"
    assert clean("长" * 21)[1] == "too_long"
    nfkc = make_cleaner("NFKC", False, False)
    assert nfkc("ＡＢＣ，１２３")[0] == "ABC,123"


def test_shipped_blends_name_only_prefixes_the_corpus_configs_write():
    """Issue 9.13: every prefix of every shipped blend is ``<output_dir>/<corpus>_text_document``
    for a corpus under conf/sources/, ``<output_dir>`` being ``data/indexed`` or a folder in it
    (so the documented preprocessing command produces it)."""
    import yaml

    files = sorted((REPO / "conf/blend").glob("*.yaml")) + [
        REPO / "conf/data/pretrain_medical.yaml"
    ]
    assert len(files) >= 4
    for f in files:
        entries = yaml.safe_load(f.read_text())["blend"]
        assert entries, f
        for e in entries:
            prefix = e["prefix"]
            assert prefix.startswith("data/indexed/") and prefix.endswith("_text_document"), f
            # data/indexed/<corpus>_text_document, or under a folder of its own for another
            # tokenizer (data/indexed/ziya/<corpus>_text_document)
            corpus = prefix.rpartition("/")[2].removesuffix("_text_document")
            assert corpus in SOURCES, f"{f.name}: {prefix} is written by no conf/sources/ corpus"


def test_chinese_field_names_in_templates_and_fields():
    """Issue 9.9: ``{问}`` placeholders read the field 问, and ``fields={q: '问'}`` composes."""
    rec = {"问": "头痛怎么办？", "答": "多休息。", "科室": "内科"}
    opts = SourceConfig(files=["x"], render="template", template=["问：{问}", "答：{答}"])
    assert make_renderer(opts)(rec) == "问：头痛怎么办？\n答：多休息。"
    opts = SourceConfig(files=["x"], render="template", template="[{科室}] {q_1}", required=[])
    assert make_renderer(opts)({"科室": "内科"}) == "[内科] "
    # A record without the field is malformed, not an empty text.
    from sfmed.data.readers import MalformedRecord

    with pytest.raises(MalformedRecord, match="missing field '问'"):
        make_renderer(SourceConfig(files=["x"], render="template", template="{问}"))({"q": "x"})
    # The documented command-line forms (Hydra, against the schema).
    base = ["input=x.jsonl", "reader=jsonl", "render=template", "tokenizer=t", "output_dir=o"]
    cfg = _compose([*base, "template=['问：{q}','答：{a}']", "fields={q: '问', a: '答'}"])
    assert dict(cfg.fields) == {"q": "问", "a": "答"}
    assert make_renderer(cfg)(rec) == "问：头痛怎么办？\n答：多休息。"
    cfg = _compose([*base, "template='{q}'", "+fields.q='问'"])
    assert dict(cfg.fields) == {"q": "问"}
    cfg = _compose([*base, "render=dialogue", "roles={doctor: '医生：', system: null}"])
    assert cfg.roles == {"doctor": "医生：", "system": None}
    # Unset and empty give the same resume fingerprint.
    assert SourceConfig(fields={}).reader_options() == SourceConfig().reader_options()
    with pytest.raises(ConfigError, match="fields=.* must map names to record keys"):
        PreprocessConfig(tokenizer="t", output_dir="o", input="x", fields=["问"])


def test_max_malformed_share_is_validated():
    with pytest.raises(ConfigError, match=r"max_malformed_share=1\.5 must be in \[0, 1\]"):
        PreprocessConfig(tokenizer="t", output_dir="o", input="x", max_malformed_share=1.5)
    assert _compose(["input=x", "tokenizer=t", "output_dir=o"]).max_malformed_share == 0.5
