"""The proof of compatibility: real megatron-core (TP=2 x PP=2, gloo, CPU emulation) loads sfmed's
conversions with its own dist_checkpointing.load and reproduces transformers' fp32 logits; what
megatron-core saves (also with virtual pipeline chunks and optimizer entries) converts back to the
original HF tensors bit for bit. One torchrun launch serves every test here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, parse_result
from sfmed.convert import convert_hf_to_mcore, convert_mcore_to_hf
from sfmed.convert.verify import compare_logits, hf_logits, make_tokens
from sfmed.core.ports import free_port
from sfmed.core.torch_dist import TorchDistReader

HERE = Path(__file__).parent
OLD_FIXTURE = HERE.parent / "fixtures" / "convert_v0"
# megatron-core itself loads, runs and saves here: run on every supported release
pytestmark = [pytest.mark.dist, pytest.mark.mcore_compat]


def _run_torchrun(script: Path, *args, nproc: int, timeout: int = 600) -> str:
    port = free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        str(script),
        *map(str, args),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(
            f"torchrun {script.name} exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-8000:]}"
        )
    return proc.stdout


@pytest.fixture(scope="module")
def megatron_run(tmp_path_factory):
    """Convert three tiny models, let megatron-core load/forward/save them in one torchrun."""
    from sfmed.utils.tiny import make_tiny_qwen2

    tmp = tmp_path_factory.mktemp("mcore_load")
    gqa = make_tiny_qwen2(tmp / "hf_gqa", seed=0)  # 8 heads / 2 KV heads, untied, vocab 1000
    mha = make_tiny_qwen2(tmp / "hf_mha", seed=1, num_kv_heads=8, tie_word_embeddings=True)
    ck = {
        "gqa_tp2pp2": (gqa, 2, 2),  # same layout as the loader
        "gqa_tp1": (gqa, 1, 1),  # resharded on load
        "mha_tied_tp4": (mha, 4, 1),  # tied embeddings at PP=2 on load
    }
    for name, (src, tp, pp) in ck.items():
        convert_hf_to_mcore(src, tmp / name, tp=tp, pp=pp, progress=False)
    tokens = make_tokens(1000, 2, 24, seed=5)
    torch.save(tokens, tmp / "tokens.pt")
    spec = {
        "tokens": str(tmp / "tokens.pt"),
        "logits": [
            {
                "ckpt": str(tmp / name),
                "out": str(tmp / f"{name}.logits.pt"),
                "resave": str(tmp / f"{name}.megatron") if name == "gqa_tp2pp2" else None,
            }
            for name in ck
        ],
        "vpp": {"ckpt": str(tmp / "gqa_tp1"), "root": str(tmp / "trained_vpp")},
    }
    # A checkpoint written before model families existed (TP=2, PP=1, bf16): loaded at PP=2.
    torch.save(make_tokens(100, 2, 16, seed=6), tmp / "v0_tokens.pt")
    spec["logits"].append(
        {
            "ckpt": str(OLD_FIXTURE / "mcore"),
            "out": str(tmp / "v0_fixture.logits.pt"),
            "tokens": str(tmp / "v0_tokens.pt"),
        }
    )
    (tmp / "spec.json").write_text(json.dumps(spec))
    out = _run_torchrun(HERE / "worker_load.py", tmp / "spec.json", nproc=4)
    return {
        "tmp": tmp,
        "gqa": gqa,
        "mha": mha,
        "tokens": tokens,
        "names": list(ck),
        "result": parse_result(out),
    }


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118
                out[k] = h.get_tensor(k)
    return out


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _hf_tensors(a), _hf_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k], tb[k]), k


def _dcp_object(ckpt, key):
    """A pickled object of a DCP checkpoint, read with torch's own loader."""
    from torch.distributed.checkpoint import FileSystemReader, load

    sd = {key: io.BytesIO()}
    load(sd, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
    obj = sd[key]
    if isinstance(obj, io.BytesIO):  # torch < 2.14 hands back the bytes, newer the object
        obj.seek(0)
        obj = torch.load(obj, weights_only=True)
    return obj


@pytest.mark.parametrize("name", ["gqa_tp2pp2", "gqa_tp1", "mha_tied_tp4"])
def test_megatron_logits_match_transformers(megatron_run, name):
    """fp32 logits of GPTModel at TP=2xPP=2 vs transformers: max |d| <= 1e-4, argmax equal."""
    r = megatron_run
    src = r["mha"] if name.startswith("mha") else r["gqa"]
    ref = hf_logits(src, r["tokens"], torch.float32, "cpu")
    got = torch.load(r["tmp"] / f"{name}.logits.pt", weights_only=True)
    cmp = compare_logits(ref, got)
    assert cmp.max_abs_diff <= 1e-4, cmp.line()
    assert torch.equal(ref.argmax(-1), got.argmax(-1)), cmp.line()


def test_old_format_checkpoint_loads_into_megatron(megatron_run):
    """The pre-family fixture (stored TP=2 x PP=1) loads at TP=2 x PP=2 and gives transformers'
    logits (its bf16 weights computed in fp32 on both sides)."""
    tokens = torch.load(megatron_run["tmp"] / "v0_tokens.pt", weights_only=True)
    ref = hf_logits(OLD_FIXTURE / "hf", tokens, torch.float32, "cpu")
    got = torch.load(megatron_run["tmp"] / "v0_fixture.logits.pt", weights_only=True)
    cmp = compare_logits(ref, got)
    assert cmp.max_abs_diff <= 1e-4, cmp.line()
    assert torch.equal(ref.argmax(-1), got.argmax(-1)), cmp.line()


def test_writer_layout_equals_megatron_save(megatron_run):
    """Our streaming writer produces the very tensors, shapes, dtypes and chunk grid that
    megatron-core's dist_checkpointing.save writes for the same model at TP=2 x PP=2."""
    mine = TorchDistReader(megatron_run["tmp"] / "gqa_tp2pp2" / "release")
    theirs = TorchDistReader(megatron_run["tmp"] / "gqa_tp2pp2.megatron")
    # megatron's marker, as the installed release writes it (0.19 dropped common_backend*)
    marker = json.loads((theirs.dir / "metadata.json").read_text())
    assert json.loads((mine.dir / "metadata.json").read_text()) == marker
    assert marker["sharded_backend"] == "torch_dist"
    common = {"checkpoint_version": 3.0, "iteration": 0}
    # common.pt: megatron < 0.19 writes it; sfmed always does, since 0.16 reads nothing else
    assert torch.load(mine.dir / "common.pt") == common
    if (theirs.dir / "common.pt").exists():
        assert "common_backend" in marker
        assert torch.load(theirs.dir / "common.pt") == common
    else:  # megatron >= 0.19: the common state is an object in the DCP files
        assert "common_backend" not in marker
        for ckpt in (mine, theirs):
            assert _dcp_object(ckpt.dir, "common_state/shard_0_1") == [common]
    # the same DCP entries (tensors and objects, common_state included where megatron has it)
    md_a, md_b = mine.metadata.state_dict_metadata, theirs.metadata.state_dict_metadata
    assert sorted(md_a) == sorted(md_b)
    for key in mine.tensor_keys():
        assert mine.shape(key) == theirs.shape(key), key
        assert mine.dtype(key) == theirs.dtype(key), key
        assert sorted(mine.chunks(key)) == sorted(theirs.chunks(key)), key
        full = (0,) * len(mine.shape(key))
        assert torch.equal(
            mine.read(key, full, mine.shape(key)), theirs.read(key, full, theirs.shape(key))
        ), key


def test_megatron_saved_checkpoint_converts_back_exactly(megatron_run, tmp_path):
    """A checkpoint written by megatron-core itself (no sfmed.json, no HF files beside it) goes
    back to the original HF tensors bit for bit, given the HF config."""
    r = megatron_run
    out = tmp_path / "back"
    convert_mcore_to_hf(r["tmp"] / "gqa_tp2pp2.megatron", out, hf_config=r["gqa"], progress=False)
    _assert_same_tensors(r["gqa"], out)


def test_trained_vpp_checkpoint_with_optimizer_exports(megatron_run, tmp_path):
    """Megatron-LM's trained layout (tracker -> iter_0000100, model0/model1 chunks of virtual
    pipeline stages, optimizer tensors) exports only the model, exactly."""
    r = megatron_run
    # pipeline rank 0 holds layers 0 and 2 with interleaved virtual stages
    offsets = {k.split("@")[1] for k in r["result"]["vpp_layer_keys"]}
    assert offsets == {"0", "2"}, r["result"]
    out = tmp_path / "back"
    convert_mcore_to_hf(r["tmp"] / "trained_vpp", out, hf_config=r["gqa"], progress=False)
    _assert_same_tensors(r["gqa"], out)
