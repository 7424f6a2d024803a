"""Atomic outputs and the Megatron checkpoint layout helpers."""

import pytest

from sfmed.core import megatron_layout as ml
from sfmed.core.atomic import OutputExistsError, atomic_dir, atomic_write_text


def test_atomic_dir_renames_on_success_and_cleans_on_error(tmp_path):
    dst = tmp_path / "out"
    with atomic_dir(dst) as d:
        (d / "a.txt").write_text("x")
        assert not dst.exists()  # invisible until complete
    assert (dst / "a.txt").read_text() == "x"

    with pytest.raises(OutputExistsError, match="overwrite=true"), atomic_dir(dst):
        pass

    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "other") as d:
        (d / "half").write_text("partial")
        raise KeyboardInterrupt
    assert not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left behind

    with atomic_dir(dst, overwrite=True) as d:
        (d / "b.txt").write_text("y")
    assert sorted(p.name for p in dst.iterdir()) == ["b.txt"]


def test_tracker_and_resolve(tmp_path):
    with pytest.raises(ml.CheckpointNotFoundError, match="latest_checkpointed_iteration"):
        ml.read_tracker(tmp_path)
    (tmp_path / "iter_0000020").mkdir()
    (tmp_path / "iter_0000020" / "metadata.json").write_text("{}")
    ml.write_tracker(tmp_path, 20)
    assert ml.read_tracker(tmp_path) == 20
    assert ml.resolve_checkpoint(tmp_path) == tmp_path / "iter_0000020"
    assert ml.resolve_checkpoint(tmp_path / "iter_0000020") == tmp_path / "iter_0000020"
    ml.write_tracker(tmp_path, "release")
    with pytest.raises(ml.CheckpointNotFoundError, match="release"):
        ml.resolve_checkpoint(tmp_path)
    atomic_write_text(tmp_path / ml.TRACKER, "garbage\n")
    with pytest.raises(ml.CheckpointNotFoundError, match="garbage"):
        ml.read_tracker(tmp_path)
    ml.write_meta(tmp_path / "iter_0000020", {"tp": 2})
    assert ml.read_meta(tmp_path / "iter_0000020") == {"tp": 2}
    assert ml.iter_dir_name(7) == "iter_0000007" and ml.iter_dir_name("release") == "release"
