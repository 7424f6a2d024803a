"""Pretraining's pre-flight (``make_plan`` + the recipe's ``resolve``): data that does not fit the
model, empty data, empty splits, warmup on short runs and the architecture ``init_from``
implies — all refused (or resolved) before any process group or model exists."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from conftest import REPO
from sfmed.config.pretrain import PretrainConfig, register
from sfmed.core import megatron_layout as layout
from sfmed.core.errors import ConfigError
from sfmed.data.indexed import BulkIndexedWriter
from sfmed.data.metadata import write_sidecar
from sfmed.models import arch_to_dict

QWEN2_TOK = {
    "path": "tok/qwen2",
    "hash": "a1b2c3d4e5f60718",
    "vocab_size": 151646,
    "eod_id": 151643,
}


def compose(overrides: list[str]) -> PretrainConfig:
    """The typed config launch/pretrain.py would get for ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="pretrain", overrides=overrides)
    return OmegaConf.to_object(cfg)


def plan(overrides: list[str], world: int = 1):
    from sfmed.recipes.pretrain import PretrainRecipe
    from sfmed.train.plan import make_plan

    cfg = compose(["device=cpu", *overrides])
    return make_plan(cfg, PretrainRecipe(cfg), world_size=world)


def write(prefix: Path, docs: list[list[int]], dtype=np.uint16, tokenizer: dict | None = None):
    """An indexed dataset of ``docs`` (a sidecar recording ``tokenizer`` when given)."""
    w = BulkIndexedWriter(prefix, dtype)
    if docs:
        w.add_chunk(np.concatenate([np.asarray(d) for d in docs]), np.array([len(d) for d in docs]))
    w.finish()
    if tokenizer is not None:
        write_sidecar(
            prefix,
            {
                "tokenizer": tokenizer,
                "documents": w.documents,
                "bin_bytes": w.bin_bytes,
                "idx_bytes": w.idx_bytes,
            },
        )
    return str(prefix)


def docs(n: int, length: int = 40) -> list[list[int]]:
    return [list(range(3 + i, 3 + i + length)) for i in range(n)]


def test_data_of_another_tokenizer_is_refused_naming_both(tmp_path):
    # Issue 9.1: model=tiny (1,000 ids) on Qwen2-tokenized data trained silently.
    qwen = write(
        tmp_path / "qwen_text_document", [[5, 151643], [7, 151643]] * 60, np.int32, QWEN2_TOK
    )
    with pytest.raises(ConfigError) as e:
        plan([f"data.prefix={qwen}", f"ckpt_dir={tmp_path}/r", "model=tiny"])
    msg = str(e.value)
    assert qwen in msg and "151,646" in msg and "1,000 ids" in msg and "tok/qwen2" in msg
    # EOD given for the model (data.eod_id) that the data does not use: named with both ids.
    with pytest.raises(ConfigError, match=r"EOD id 151643(.|\n)*model's EOD id is 7"):
        plan([f"data.prefix={qwen}", f"ckpt_dir={tmp_path}/r", "model=qwen2_0_5b", "data.eod_id=7"])
    assert not (tmp_path / "r").exists() and not dist.is_initialized()


def test_data_without_sidecar_gets_its_max_id_checked(tmp_path):
    bare = write(tmp_path / "bare_text_document", [*docs(200), [5, 4321, 6]])
    with pytest.raises(ConfigError, match=r"no .json sidecar(.|\n)*token id 4,321(.|\n)*1,000 ids"):
        plan([f"data.prefix={bare}", f"ckpt_dir={tmp_path}/r"])
    fits = write(tmp_path / "fits_text_document", docs(200))
    assert plan([f"data.prefix={fits}", f"ckpt_dir={tmp_path}/r"]).recipe.prefixes == [fits]


def test_empty_prefix_is_refused_before_any_process_group(tmp_path):
    # Issue 9.2: a 0-byte .bin passed pre-flight and died in every rank's mmap.
    empty = write(tmp_path / "empty_text_document", [], np.int32, QWEN2_TOK)
    with pytest.raises(ConfigError, match=r"empty_text_document is empty \(0 documents"):
        plan([f"data.prefix={empty}", f"ckpt_dir={tmp_path}/r"])
    bare_empty = write(tmp_path / "bare_empty_text_document", [])
    with pytest.raises(ConfigError, match=r"is empty"):
        plan([f"data.prefix={bare_empty}", f"ckpt_dir={tmp_path}/r"])
    assert not dist.is_initialized() and not (tmp_path / "r").exists()


def test_every_problem_is_reported_at_once(tmp_path):
    a = write(tmp_path / "a_text_document", docs(200), np.int32, {**QWEN2_TOK, "vocab_size": 5000})
    blend = f"data.blend=[{{prefix: {a}, weight: 1}}, {{prefix: {tmp_path}/c_text_document, weight: 1}}]"
    write(
        tmp_path / "c_text_document",
        [[1, 2000, 3]] * 200,
        np.int32,
        {**QWEN2_TOK, "vocab_size": 3000},
    )
    with pytest.raises(ConfigError) as e:
        plan([blend, f"ckpt_dir={tmp_path}/r"])
    msg = str(e.value)
    # Both blend entries are named, each with its recorded vocabulary and the model's.
    assert msg.startswith("2 problems:")
    assert "a_text_document" in msg and "5,000" in msg and "c_text_document" in msg
    assert "3,000" in msg and msg.count("1,000 ids") == 2


def test_empty_split_is_refused_naming_it(tmp_path):
    # Issue 9.3: 4 documents, split 99,1,0 → the valid split gets 0 documents.
    four = write(tmp_path / "four_text_document", docs(4))
    with pytest.raises(
        ConfigError, match=r"4 documents(.|\n)*valid split 0 documents(.|\n)*eval_interval=0"
    ):
        plan([f"data.prefix={four}", f"ckpt_dir={tmp_path}/r", "train.eval_interval=5"])
    with pytest.raises(ConfigError, match=r"train split 0 documents"):
        plan([f"data.prefix={four}", f"ckpt_dir={tmp_path}/r", "data.split='1,99,0'",
              "train.eval_interval=5"])  # fmt: skip


@pytest.mark.slow  # a fresh process that imports megatron-core: ~50 s on 2 busy cores
def test_four_documents_default_split_without_eval_builds_without_hanging(tmp_path):
    """The default split and eval_interval=0 on 4 documents: the empty valid split is not built
    (megatron's GPTDataset would search forever), and the train split has every document."""
    four = write(tmp_path / "four_text_document", docs(4))
    script = textwrap.dedent(f"""
        from test_preflight import plan
        from sfmed.recipes.pretrain import build_gpt_datasets
        p = plan(["data.prefix={four}", "ckpt_dir={tmp_path}/r", "data.seq_length=16",
                  "train.steps=3", "train.global_batch_size=2", "train.micro_batch_size=2",
                  "optim.warmup_steps=0"])
        assert p.recipe is not None
        from test_preflight import compose
        cfg = compose(["device=cpu", "data.prefix={four}", "ckpt_dir={tmp_path}/r",
                       "data.seq_length=16", "train.steps=3", "train.global_batch_size=2",
                       "train.micro_batch_size=2", "optim.warmup_steps=0"])
        train, valid = build_gpt_datasets(cfg, p, p.recipe)
        print("BUILT", len(train), valid)
    """)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(map(str, [REPO, REPO / "tests", Path(__file__).parent])),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BUILT" in proc.stdout and proc.stdout.strip().endswith("None")
    assert int(proc.stdout.split()[1]) >= 6


def test_default_warmup_fits_short_runs(tmp_path):
    # Issue 9.7: optim.warmup_steps=100 stopped the docs' 30/100-step commands.
    corpus = write(tmp_path / "c_text_document", docs(200))
    base = [f"data.prefix={corpus}", f"ckpt_dir={tmp_path}/r"]
    assert plan([*base, "train.steps=30"]).warmup_steps == 2  # 5 % of 30, rounded
    assert plan([*base, "train.steps=2000"]).warmup_steps == 100
    assert plan([*base, "train.steps=1"]).warmup_steps == 0
    assert plan([*base, "train.steps=30", "optim.warmup_steps=3"]).warmup_steps == 3
    assert plan([*base, "train.steps=100", "optim.decay_steps=40"]).warmup_steps == 2
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=40 must be smaller(.|\n)*null"):
        plan([*base, "train.steps=30", "optim.warmup_steps=40"])
    with pytest.raises(ConfigError, match=r"optim.warmup_fraction=1.5"):
        compose(["optim.warmup_fraction=1.5"])


def _fake_checkpoint(root: Path, arch, it=None) -> Path:
    d = root / (layout.iter_dir_name(it) if it else "release")
    d.mkdir(parents=True)
    (d / "metadata.json").write_text("{}")
    layout.write_meta(d, {"arch": arch_to_dict(arch), "padded_vocab_size": 1024, "tp": 1, "pp": 1})
    layout.write_tracker(root, it or "release")
    return d


def test_init_from_implies_the_checkpoint_architecture(tmp_path):
    # Issue 9.8: a converted model that is not a preset shape needed model.hf_config.
    corpus = write(tmp_path / "c_text_document", docs(200))
    tiny = compose(["model=tiny"]).model.arch()
    other = dataclasses.replace(tiny, num_layers=2, hidden_size=128, ffn_hidden_size=256)
    _fake_checkpoint(tmp_path / "init", other)
    base = [f"data.prefix={corpus}", f"init_from={tmp_path / 'init'}", f"ckpt_dir={tmp_path}/r"]
    p = plan(base)  # no model=: the checkpoint's architecture
    assert (p.arch.num_layers, p.arch.hidden_size, p.arch.ffn_hidden_size) == (2, 128, 256)
    # A preset that disagrees is refused naming the preset and every differing field.
    with pytest.raises(ConfigError) as e:
        plan([*base, "model=tiny"])
    msg = str(e.value)
    assert "model=tiny" in msg and "num_layers: checkpoint 2 vs model 4" in msg
    assert "hidden_size: checkpoint 128 vs model 64" in msg and "ffn_hidden_size" in msg
    # Without a checkpoint the default is the tiny shape.
    assert plan([f"data.prefix={corpus}", f"ckpt_dir={tmp_path}/r2"]).arch == tiny


def test_data_of_another_tokenizer_than_the_checkpoints_is_refused(tmp_path, tiny_tokenizer_dir):
    """The model's tokenizer is the one that came with init_from (its hf/ folder)."""
    import shutil

    from sfmed.data.metadata import tokenizer_hash

    corpus = write(tmp_path / "c_text_document", docs(200), np.uint16,
                   {"path": "other/tok", "hash": "0123456789abcdef", "vocab_size": 600})  # fmt: skip
    tiny = compose(["model=tiny"]).model.arch()
    root = tmp_path / "init"
    _fake_checkpoint(root, tiny)
    shutil.copytree(tiny_tokenizer_dir, root / layout.HF_SIDECAR)
    base = [f"data.prefix={corpus}", f"init_from={root}", f"ckpt_dir={tmp_path}/r"]
    with pytest.raises(ConfigError) as e:
        plan(base)
    msg = str(e.value)
    assert "0123456789abcdef" in msg and tokenizer_hash(tiny_tokenizer_dir) in msg
    assert "the same ids mean different text" in msg
    # Data made with that very tokenizer passes.
    good = write(tmp_path / "g_text_document", docs(200), np.uint16,
                 {"path": "tok", "hash": tokenizer_hash(tiny_tokenizer_dir), "vocab_size": 600})  # fmt: skip
    assert plan([f"data.prefix={good}", *base[1:]]).recipe.prefixes == [good]
