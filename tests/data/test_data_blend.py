"""Blends: weights / token targets / group targets -> megatron's (prefixes, weights), and every
validation error a user can hit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from data_fixtures import qa_rows, write_jsonl

from sfmed.config.data import PreprocessConfig, SourceConfig
from sfmed.data.blend import BlendError, describe_blend, resolve_blend, tokenizer_hash
from sfmed.data.preprocess import preprocess
from sfmed.utils.tiny import make_tiny_tokenizer


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_tokenizer_dir):
    """Three outputs of one tokenizer (sizes differ) and one of another tokenizer."""
    root = tmp_path_factory.mktemp("blend")
    for name, n in (("a", 10), ("b", 30), ("c", 20)):
        write_jsonl(root / f"raw/{name}.jsonl", qa_rows(n, offset=100 * len(name) + n))
    src = {
        n: SourceConfig(
            files=[f"{n}.jsonl"], reader="jsonl", render="template", template="{question}{answer}"
        )
        for n in ("a", "b", "c")
    }
    report = preprocess(
        PreprocessConfig(
            tokenizer=str(tiny_tokenizer_dir),
            output_dir=str(root / "out"),
            data_root=str(root / "raw"),
            sources=src,
        )
    )
    other_tok = make_tiny_tokenizer(root / "other_tok", vocab_size=500)
    preprocess(
        PreprocessConfig(
            tokenizer=str(other_tok),
            output_dir=str(root / "other"),
            input=str(root / "raw/a.jsonl"),
            reader="jsonl",
            render="template",
            template="{question}{answer}",
            name="x",
        )
    )
    tokens = {n: s["tokens"] for n, s in report["sources"].items()}
    return root, tokens, other_tok


def _p(root: Path, name: str) -> str:
    return str(root / "out" / f"{name}_text_document")


def test_weights_tokens_and_groups(outputs, tiny_tokenizer_dir):
    root, tokens, _ = outputs
    prefixes, weights = resolve_blend(
        [{"prefix": _p(root, "a"), "weight": 3}, {"prefix": _p(root, "b"), "weight": 1}]
    )
    assert prefixes == [_p(root, "a"), _p(root, "b")] and weights == [0.75, 0.25]

    entries = [
        {"prefix": _p(root, "a"), "tokens": 1000, "group": "medical"},
        {"prefix": _p(root, "c"), "tokens": 3000, "group": "general"},
    ]
    prefixes, weights = resolve_blend(entries, tokenizer=tiny_tokenizer_dir)
    assert weights == [0.25, 0.75]
    info = describe_blend(entries)
    assert info[0].epochs == pytest.approx(1000 / tokens["a"]) and info[0].group == "medical"

    # Group targets shared by size: medical (a, b) gets 2/3, general (c) 1/3.
    entries = [{"prefix": _p(root, n), "group": g} for n, g in (("a", "m"), ("b", "m"), ("c", "g"))]
    _, weights = resolve_blend(
        entries,
        groups={"m": {"tokens": 2e6}, "g": {"tokens": 1e6}},
        tokenizer=tokenizer_hash(tiny_tokenizer_dir),
    )
    ab = tokens["a"] + tokens["b"]
    assert weights == pytest.approx([2 / 3 * tokens["a"] / ab, 2 / 3 * tokens["b"] / ab, 1 / 3])


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([], "empty"),
        (
            [{"prefix": "nope/x_text_document", "weight": 1}],
            r"x_text_document\.bin and .*\.idx not found",
        ),
        ([{"prefix": "{a}.bin", "weight": 1}], "without the extension"),
        ([{"prefix": "{a}", "weight": 0}], "weight=0 must be a positive number"),
        ([{"prefix": "{a}", "weight": -2}], "weight=-2 must be a positive number"),
        ([{"prefix": "{a}", "tokens": "many"}], "not a number"),
        ([{"prefix": "{a}", "weight": 1, "tokens": 5}], "both weight and tokens"),
        ([{"prefix": "{a}", "weight": 1}, {"prefix": "{b}", "tokens": 5}], "mixes weights"),
        ([{"prefix": "{a}"}], "neither weight nor tokens"),
        ([{"prefix": "{a}", "weight": 1}, {"prefix": "{a}", "weight": 2}], "both name"),
        ([{"prefix": "{a}", "weight": 1, "wieght": 2}], r"unknown key\(s\) \['wieght'\]"),
        (
            [{"prefix": "{a}", "weight": 1}, {"prefix": "{other}", "weight": 1}],
            "different tokenizers",
        ),
    ],
)
def test_validation_errors(outputs, entries, match):
    root, _, _ = outputs
    paths = {"a": _p(root, "a"), "b": _p(root, "b"), "other": str(root / "other/x_text_document")}
    entries = [
        {k: (v.format(**paths) if isinstance(v, str) else v) for k, v in e.items()} for e in entries
    ]
    with pytest.raises(BlendError, match=match):
        resolve_blend(entries)


def test_tokenizer_given_must_match(outputs, tiny_tokenizer_dir):
    root, _, other_tok = outputs
    entries = [{"prefix": _p(root, "a"), "weight": 1}]
    assert resolve_blend(entries, tokenizer=tiny_tokenizer_dir)[1] == [1.0]
    with pytest.raises(BlendError, match="tokenized with tokenizer .* but tokenizer="):
        resolve_blend(entries, tokenizer=other_tok)
    with pytest.raises(BlendError, match="neither an existing tokenizer path nor a tokenizer hash"):
        resolve_blend(entries, tokenizer="/no/such/tokenizer")


def test_missing_or_stale_sidecar(outputs, tmp_path):
    root, _, _ = outputs
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(_p(root, "a") + ext, tmp_path / f"a{ext}")
    p = str(tmp_path / "a")
    (tmp_path / "a.json").unlink()
    with pytest.raises(BlendError, match="metadata sidecar .* is missing"):
        resolve_blend([{"prefix": p, "weight": 1}])
    assert resolve_blend([{"prefix": p, "weight": 1}], require_metadata=False)[1] == [1.0]
    shutil.copy(_p(root, "a") + ".json", tmp_path / "a.json")
    with open(tmp_path / "a.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(BlendError, match="changed or only partly written"):
        resolve_blend([{"prefix": p, "weight": 1}])
    (tmp_path / "a.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BlendError, match="not an sfmed dataset sidecar"):
        resolve_blend([{"prefix": p, "weight": 1}])
