"""Every bad input of issue 2 section 5 gives one clear error before any output is written, and
an interrupted conversion never leaves a folder that looks finished."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sfmed.convert import (
    CheckpointFormatError,
    CheckpointMismatchError,
    HFCheckpointError,
    convert_hf_to_mcore,
    convert_mcore_to_hf,
)
from sfmed.convert.hf_io import SafetensorsWriter
from sfmed.core.atomic import OutputExistsError
from sfmed.core.ckpt_load import check_model_matches
from sfmed.core.errors import ConfigError
from sfmed.core.megatron_layout import CheckpointNotFoundError
from sfmed.core.torch_dist import TorchDistWriter


@pytest.fixture
def sharded_hf(tiny_qwen2_factory, tmp_path) -> Path:
    """A private copy of a tiny model saved in several shards with an index."""
    src = tiny_qwen2_factory(max_shard_size="100KB")
    dst = tmp_path / "hf"
    shutil.copytree(src, dst)
    assert (dst / "model.safetensors.index.json").is_file()
    return dst


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def _nothing_written(parent: Path, name: str = "out") -> bool:
    return not any(p.name == name or p.name.startswith(f".{name}.") for p in parent.iterdir())


def _to_mcore_fails(src: Path, tmp_path: Path, exc, match: str, **kw) -> None:
    with pytest.raises(exc, match=match):
        convert_hf_to_mcore(src, tmp_path / "out", progress=False, **kw)
    assert _nothing_written(tmp_path)


def test_missing_shard(sharded_hf, tmp_path):
    _shards(sharded_hf)[1].unlink()
    _to_mcore_fails(sharded_hf, tmp_path, HFCheckpointError, r"names shard model-00002.*missing")


def test_index_names_missing_file(sharded_hf, tmp_path):
    index = sharded_hf / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    index.write_text(json.dumps(data))
    _to_mcore_fails(sharded_hf, tmp_path, HFCheckpointError, r"model-00099-of-00099.*missing")


def test_truncated_shard(sharded_hf, tmp_path):
    shard = _shards(sharded_hf)[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    _to_mcore_fails(sharded_hf, tmp_path, HFCheckpointError, r"truncated or corrupt")


def test_dtype_mismatch_between_shards(sharded_hf, tmp_path):
    from safetensors.torch import load_file, save_file

    shard = _shards(sharded_hf)[0]
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(shard).items()}
    save_file(tensors, shard, metadata={"format": "pt"})
    _to_mcore_fails(sharded_hf, tmp_path, HFCheckpointError, r"different dtypes.*BF16|F32.*BF16")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.pop("hidden_size"), r"lacks required field.*hidden_size"),
        (lambda c: c.update(model_type="gpt2"), r"model_type='gpt2' is not supported"),
        (lambda c: c.update(use_sliding_window=True), r"sliding-window"),
        (lambda c: c.update(rope_scaling={"type": "yarn", "factor": 4.0}), r"rope scaling"),
        (lambda c: c.update(num_attention_heads="8"), r"positive integer"),
    ],
)
def test_bad_config(sharded_hf, tmp_path, edit, match):
    cfg_path = sharded_hf / "config.json"
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    _to_mcore_fails(sharded_hf, tmp_path, ConfigError, match)


def test_config_and_weights_disagree(sharded_hf, tmp_path):
    cfg_path = sharded_hf / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 256
    cfg_path.write_text(json.dumps(cfg))
    _to_mcore_fails(sharded_hf, tmp_path, HFCheckpointError, r"gate_proj.weight has shape")


def test_no_safetensors(tmp_path, tiny_qwen2_factory):
    src = tmp_path / "bin_only"
    src.mkdir()
    shutil.copy(tiny_qwen2_factory() / "config.json", src)
    (src / "pytorch_model.bin").write_bytes(b"x")
    _to_mcore_fails(src, tmp_path, HFCheckpointError, r"no \*\.safetensors.*safe_serialization")


@pytest.mark.parametrize(
    "tp,pp,lps,match",
    [
        (3, 1, None, r"parallel.tp=3 does not divide num_attention_heads=8.*\[1, 2, 4, 8\]"),
        (1, 3, None, r"parallel.pp=3 does not divide num_layers=4; valid pp: \[1, 2, 4\]"),
        (1, 8, None, r"parallel.pp=8 exceeds num_layers=4"),
        (1, 2, [1, 2], r"layers_per_stage=\[1, 2\].*summing to num_layers=4"),
    ],
)
def test_impossible_parallel(tiny_qwen2_factory, tmp_path, tp, pp, lps, match):
    _to_mcore_fails(
        tiny_qwen2_factory(), tmp_path, ConfigError, match, tp=tp, pp=pp, layers_per_stage=lps
    )


def test_dst_exists_refused_unless_overwrite(tiny_qwen2_factory, tmp_path):
    hf = tiny_qwen2_factory()
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match=r"overwrite=true"):
        convert_hf_to_mcore(hf, dst, progress=False)
    assert (dst / "precious.txt").read_text() == "keep me"
    convert_hf_to_mcore(hf, dst, overwrite=True, progress=False)
    assert not (dst / "precious.txt").exists() and (dst / "release" / ".metadata").is_file()
    back = tmp_path / "back"
    back.mkdir()
    (back / "x").write_text("x")
    with pytest.raises(OutputExistsError):
        convert_mcore_to_hf(dst, back, progress=False)


def test_checkpoint_without_marker(tiny_qwen2_factory, tmp_path):
    hf = tiny_qwen2_factory()
    ck = tmp_path / "ck"
    convert_hf_to_mcore(hf, ck, progress=False)
    (ck / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"latest_checkpointed_iteration.txt"):
        convert_mcore_to_hf(ck, tmp_path / "out", progress=False)
    (ck / "release" / "metadata.json").unlink()  # the iteration folder itself, without marker
    with pytest.raises(CheckpointNotFoundError, match=r"no metadata.json"):
        convert_mcore_to_hf(ck / "release", tmp_path / "out", progress=False)
    assert _nothing_written(tmp_path)


def test_incomplete_megatron_checkpoint(tiny_qwen2_factory, tmp_path):
    hf = tiny_qwen2_factory()
    ck = tmp_path / "ck"
    convert_hf_to_mcore(hf, ck, tp=2, progress=False)
    data = ck / "release" / "__1_0.distcp"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(CheckpointFormatError, match=r"__1_0.distcp is truncated"):
        convert_mcore_to_hf(ck, tmp_path / "out", progress=False)
    data.unlink()
    with pytest.raises(CheckpointFormatError, match=r"__1_0.distcp is missing"):
        convert_mcore_to_hf(ck, tmp_path / "out", progress=False)
    assert _nothing_written(tmp_path)


def test_foreign_checkpoint_needs_hf_config(tiny_qwen2_factory, tmp_path):
    hf = tiny_qwen2_factory()
    ck = tmp_path / "ck"
    convert_hf_to_mcore(hf, ck, progress=False)
    (ck / "release" / "sfmed.json").unlink()
    shutil.rmtree(ck / "hf")
    with pytest.raises(CheckpointFormatError, match=r"pass hf_config="):
        convert_mcore_to_hf(ck, tmp_path / "out", progress=False)
    convert_mcore_to_hf(ck, tmp_path / "out", hf_config=hf, progress=False)


def test_model_mismatch_message():
    """load_mcore_weights names the mismatching numbers before megatron reads anything."""
    config = SimpleNamespace(
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=128,
        num_attention_heads=8,
        num_query_groups=2,
        kv_channels=16,
    )
    chunk = SimpleNamespace(
        config=config, vocab_size=1024, share_embeddings_and_output_weights=False
    )
    meta = {
        "arch": {
            "num_layers": 4,
            "hidden_size": 64,
            "ffn_hidden_size": 128,
            "num_attention_heads": 8,
            "num_query_groups": 2,
            "kv_channels": 8,
            "tie_word_embeddings": False,
        },
        "padded_vocab_size": 1024,
    }
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint hidden_size 64 vs model 128"):
        check_model_matches(chunk, meta, Path("ck"))
    config.hidden_size, config.kv_channels, chunk.vocab_size = 64, 8, 512
    with pytest.raises(CheckpointMismatchError, match=r"padded_vocab_size 1024 vs model 512"):
        check_model_matches(chunk, meta, Path("ck"))


class _Boom(KeyboardInterrupt):
    pass


def test_interrupted_conversion_leaves_nothing_complete(tiny_qwen2_factory, tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing (either direction): no dst, no temporary folder left."""
    hf = tiny_qwen2_factory()
    ck = tmp_path / "ck"
    convert_hf_to_mcore(hf, ck, progress=False)
    calls = {"n": 0}

    def interrupt_after(n, orig):
        def wrapped(self, *a, **k):
            calls["n"] += 1
            if calls["n"] > n:
                raise _Boom()
            return orig(self, *a, **k)

        return wrapped

    monkeypatch.setattr(
        TorchDistWriter, "add_chunk", interrupt_after(10, TorchDistWriter.add_chunk)
    )
    with pytest.raises(_Boom):
        convert_hf_to_mcore(hf, tmp_path / "out", tp=2, progress=False)
    assert _nothing_written(tmp_path)
    calls["n"] = 0
    monkeypatch.setattr(SafetensorsWriter, "write", interrupt_after(10, SafetensorsWriter.write))
    with pytest.raises(_Boom):
        convert_mcore_to_hf(ck, tmp_path / "out", progress=False)
    assert _nothing_written(tmp_path)
    # an interrupted overwrite keeps the old output intact
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    calls["n"] = 0
    with pytest.raises(_Boom):
        convert_mcore_to_hf(ck, tmp_path / "out", overwrite=True, progress=False)
    assert (tmp_path / "out" / "old.txt").read_text() == "old"
