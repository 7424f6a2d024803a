"""sfmed.core.mcore_compat: each release decision against faked megatron-core signatures (so
both branches run on any installed release) and against the installed megatron-core itself."""

from __future__ import annotations

import dataclasses
import io
import json
import logging

import pytest
import torch

import sfmed.convert  # noqa: F401  (first: sfmed.convert and sfmed.core.torch_dist import each other)
from sfmed.core import mcore_compat
from sfmed.core.torch_dist import TorchDistWriter

pytestmark = pytest.mark.mcore_compat


# -- get_batch_on_this_cp_rank --------------------------------------------------------------


def _recorder(calls):
    def v016(batch, cp_group=None):
        calls.append({"cp_group": cp_group})
        return batch

    def v019(
        batch,
        is_hybrid_cp,
        cp_group=None,
        hybrid_cp_group_func=None,
        use_per_sequence_balancing=False,
    ):
        calls.append({"cp_group": cp_group, "is_hybrid_cp": is_hybrid_cp})
        return batch

    return v016, v019


def test_cp_batch_passes_the_cp_group_explicitly_on_0_16_signature():
    calls = []
    v016, _ = _recorder(calls)
    group = object()
    batch = {"tokens": torch.arange(4)}
    assert mcore_compat.get_batch_on_this_cp_rank(batch, group, fn=v016) is batch
    assert calls == [{"cp_group": group}]


def test_cp_batch_passes_group_and_no_hybrid_cp_on_0_19_signature():
    calls = []
    _, v019 = _recorder(calls)
    group = object()
    mcore_compat.get_batch_on_this_cp_rank({}, group, fn=v019)
    # is_hybrid_cp is required in 0.19 and cp_group=None would mean the world group there.
    assert calls == [{"cp_group": group, "is_hybrid_cp": False}]


def test_cp_batch_with_installed_megatron_on_a_one_rank_group(tmp_path):
    """The real function, called through the compat layer, on a CP group of one rank: the
    batch comes back whole (no release may slice it along the world group)."""
    import torch.distributed as dist
    from megatron.core.utils import get_batch_on_this_cp_rank

    assert not dist.is_initialized()
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        tokens = torch.arange(16).view(2, 8)
        batch = {"tokens": tokens.clone(), "labels": tokens + 1, "loss_mask": torch.ones(2, 8)}
        out = mcore_compat.get_batch_on_this_cp_rank(
            batch, dist.group.WORLD, fn=get_batch_on_this_cp_rank
        )
        assert torch.equal(out["tokens"], tokens)
        assert torch.equal(out["labels"], tokens + 1)
        assert out["loss_mask"].shape == (2, 8)
    finally:
        dist.destroy_process_group()


# -- dist_checkpointing.save's async strategy ------------------------------------------------


def test_save_kwargs_choose_mcore_async_writer_where_save_has_a_strategy(caplog):
    def save_019(sharded_state_dict, checkpoint_dir, async_strategy="nvrx"):
        pass

    def save_016(sharded_state_dict, checkpoint_dir, async_sharded_save=False):
        pass

    mcore_compat._logged_async_strategy = False
    with caplog.at_level(logging.INFO, logger="sfmed.core.mcore_compat"):
        assert mcore_compat.dist_save_kwargs(True, save_fn=save_019) == {"async_strategy": "mcore"}
        assert mcore_compat.dist_save_kwargs(True, save_fn=save_019) == {"async_strategy": "mcore"}
    # sync saves pass it too (harmless), and the choice is logged once per process
    assert mcore_compat.dist_save_kwargs(False, save_fn=save_019) == {"async_strategy": "mcore"}
    assert sum("async_strategy='mcore'" in r.getMessage() for r in caplog.records) == 1
    assert mcore_compat.dist_save_kwargs(True, save_fn=save_016) == {}


def test_save_kwargs_match_the_installed_release():
    from megatron.core import dist_checkpointing

    kwargs = mcore_compat.dist_save_kwargs(False)
    if mcore_compat.mcore_version() >= (0, 19):
        assert kwargs == {"async_strategy": "mcore"}
    else:
        assert kwargs == {}
    # whatever is chosen must be a keyword the installed save accepts
    import inspect

    assert set(kwargs) <= set(inspect.signature(dist_checkpointing.save).parameters)


# -- checkpoint layout: metadata.json and the common state -----------------------------------


def test_version_is_the_installed_megatron_core():
    from megatron.core import package_info

    major, minor = (int(x) for x in package_info.__version__.split(".")[:2])
    assert mcore_compat.mcore_version() == (major, minor)


def test_marker_and_common_state_decision_per_version():
    assert mcore_compat.checkpoint_marker((0, 16)) == {
        "sharded_backend": "torch_dist",
        "sharded_backend_version": 1,
        "common_backend": "torch",
        "common_backend_version": 1,
    }
    assert mcore_compat.checkpoint_marker((0, 19)) == {
        "sharded_backend": "torch_dist",
        "sharded_backend_version": 1,
    }
    assert not mcore_compat.common_state_in_dcp((0, 16))
    assert mcore_compat.common_state_in_dcp((0, 19))
    assert mcore_compat.common_state_in_dcp((1, 0))


def test_marker_equals_what_installed_megatron_writes(tmp_path):
    """metadata.json as megatron-core's own save_config writes it for a torch_dist save."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    save_config(CheckpointingConfig("torch_dist", 1), str(tmp_path))
    theirs = json.loads((tmp_path / "metadata.json").read_text())
    assert mcore_compat.checkpoint_marker() == theirs
    # 0.19 dropped the common_backend fields exactly when it moved the common state into DCP
    fields = {f.name for f in dataclasses.fields(CheckpointingConfig)}
    assert mcore_compat.common_state_in_dcp() == ("common_backend" not in fields)


def _write_ckpt(path, common):
    w = TorchDistWriter(path, background=False)
    w.add_chunk("w", (2, 3), (0, 0), torch.arange(6.0).view(2, 3), rank=0)
    w.finish(common)


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


def test_writer_output_loads_with_installed_megatron(tmp_path):
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    common = {"checkpoint_version": 3.0, "iteration": 7}
    _write_ckpt(tmp_path / "ck", common)
    assert torch.load(tmp_path / "ck" / "common.pt") == common  # read by every release
    assert load_common_state_dict(str(tmp_path / "ck")) == common
    if mcore_compat.common_state_in_dcp():
        # also where 0.19's own save puts it, read the way 0.19 reads it without common.pt
        assert _dcp_object(tmp_path / "ck", mcore_compat.COMMON_STATE_KEY) == [common]
        (tmp_path / "ck" / "common.pt").unlink()
        assert load_common_state_dict(str(tmp_path / "ck")) == common


def test_add_legacy_common_state_keeps_an_existing_file(tmp_path):
    common = {"iteration": 3}
    _write_ckpt(tmp_path / "ck", common)
    before = (tmp_path / "ck" / "common.pt").read_bytes()
    assert mcore_compat.add_legacy_common_state(tmp_path / "ck") is False
    assert (tmp_path / "ck" / "common.pt").read_bytes() == before


@pytest.mark.skipif(
    not mcore_compat.common_state_in_dcp(), reason="megatron-core < 0.19 always writes common.pt"
)
def test_add_legacy_common_state_restores_common_pt_from_the_dcp_object(tmp_path):
    common = {"checkpoint_version": 3.0, "iteration": 11, "train_state": {"consumed": 88}}
    _write_ckpt(tmp_path / "ck", common)
    (tmp_path / "ck" / "common.pt").unlink()  # as megatron-core 0.19's own save leaves it
    assert mcore_compat.add_legacy_common_state(tmp_path / "ck") is True
    assert torch.load(tmp_path / "ck" / "common.pt") == common
    assert not list((tmp_path / "ck").glob(".common.pt.tmp-*"))


def test_only_the_legacy_common_deprecation_warning_is_dropped(caplog):
    logger = logging.getLogger("megatron.core.dist_checkpointing.strategies.common")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("load_common is deprecated and will be removed in a future release.")
        logger.warning("Common file x does not exist")
    assert [r.getMessage() for r in caplog.records] == ["Common file x does not exist"]


# -- write_results_queue -----------------------------------------------------------------------


def _results_queue_getter(fsa):
    return getattr(fsa, "get_write_results_queue", None) or fsa._get_write_results_queue


def test_cpu_write_results_queue_is_served_by_a_forked_process(monkeypatch):
    """On CPU the torch_dist writer's results queue is served by a fork of this process (torch
    already loaded), not a spawned interpreter that re-imports torch; megatron's own getter
    returns it and it carries megatron's write results; a second call keeps it."""
    import os

    import psutil
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.storage import WriteResult

    monkeypatch.setattr(fsa, "_results_queue", None)
    monkeypatch.setattr(mcore_compat, "_write_results_manager", None)
    before = {p.pid for p in psutil.Process().children()}
    assert mcore_compat.write_results_queue(cuda=False)
    queue = fsa._results_queue
    assert queue is not None and _results_queue_getter(fsa)() is queue
    (server,) = [p for p in psutil.Process().children() if p.pid not in before]
    assert server.cmdline() == psutil.Process(os.getpid()).cmdline()  # a fork, not spawn_main
    result = WriteResult(MetadataIndex("w", (0,)), 12, None)
    queue.put({0: [result]})
    assert queue.get(timeout=30) == {0: [result]}
    assert not mcore_compat.write_results_queue(cuda=False)  # already there: kept
    assert fsa._results_queue is queue
    mcore_compat._write_results_manager.shutdown()


_RANK_SCRIPT = """
import sys, time
from sfmed.core import mcore_compat
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
assert mcore_compat.write_results_queue(cuda=sys.argv[1] == "cuda")
get = getattr(fa, "get_write_results_queue", None) or fa._get_write_results_queue
q = get()
assert q is fa._results_queue
q.put("through the manager"); assert q.get(timeout=60) == "through the manager"
print(mcore_compat._write_results_manager._process.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # a forked / a spawned manager
def test_write_results_manager_dies_with_its_rank(device):
    """The manager process serving the queue outlives the exit signals its rank's group gets
    (the rank saves through it) and dies when its rank is SIGKILLed (megatron's own spawned
    manager kept running, with its resource tracker, after every killed run)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    rank = subprocess.Popen(
        [sys.executable, "-c", _RANK_SCRIPT, device], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        line = rank.stdout.readline()
        assert line.strip().isdigit(), f"rank script failed (exit {rank.wait(timeout=60)})"
        manager = psutil.Process(int(line))
        assert manager.ppid() == rank.pid
        spawned = "spawn_main" in " ".join(manager.cmdline())
        assert spawned == (device == "cuda")
        helpers = [manager, *manager.children(recursive=True)]
        helpers += [
            p for p in psutil.Process(rank.pid).children() if "resource_tracker" in p.cmdline()[-1]
        ]
        # torchrun and Slurm signal the rank's whole group; the rank saves through the manager
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            manager.send_signal(sig)
        time.sleep(1.0)
        assert manager.is_running() and manager.status() != psutil.STATUS_ZOMBIE
        rank.send_signal(signal.SIGKILL)
        rank.wait(timeout=30)
        gone, alive = psutil.wait_procs(helpers, timeout=20)
        assert not alive, [" ".join(p.cmdline())[:100] for p in alive]
    finally:
        if rank.poll() is None:
            rank.kill()
