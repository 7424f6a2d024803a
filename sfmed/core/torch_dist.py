"""megatron-core's ``torch_dist`` checkpoint format, written and read one tensor at a time.

A torch_dist checkpoint folder is a PyTorch Distributed Checkpoint (DCP) plus two megatron files::

    metadata.json      {"sharded_backend": "torch_dist", ...}   (megatron's marker; written last)
    common.pt          torch.save of the non-tensor part of the state dict (megatron-core >= 0.19
                       keeps it in the DCP files as object ``common_state``; sfmed writes both)
    .metadata          pickled torch.distributed.checkpoint.Metadata: every tensor's global shape,
                       dtype and chunk grid, and where each chunk's bytes are
    __R_0.distcp       the chunks saved by rank R, each one a ``torch.save``d tensor

``dist_checkpointing.save`` needs the whole state dict in memory. :class:`TorchDistWriter` writes
the same files chunk by chunk (exactly what DCP's ``FileSystemWriter`` writes per item) and builds
the ``.metadata`` from DCP's own dataclasses; :class:`TorchDistReader` reads any block of any
tensor through DCP's ``FileSystemReader`` and resharding planner helpers. Both are single-process.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import uuid
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from sfmed.core.background import BackgroundWriter
from sfmed.core.errors import CheckpointFormatError

try:  # the DCP format version torch writes into .metadata
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
except ImportError:  # older torch
    CURRENT_DCP_VERSION = "1.0.0"


def owned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that owns exactly its bytes.

    torch.save writes a tensor's whole storage, so a view of a larger tensor must be copied first.
    """
    t = t.contiguous()
    if t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


DCP_METADATA = ".metadata"
COMMON = "common.pt"
MARKER = "metadata.json"
BACKEND = "torch_dist"


@contextlib.contextmanager
def _no_crc32():
    """torch.save without the zip records' CRC32: torch.load (hence DCP and megatron) never
    checks it, and computing it is a full extra pass over every byte written."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # older torch: always computes it
        yield
        return
    old = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = old


def data_file_name(rank: int) -> str:
    """The data file a (simulated) rank writes: ``__<rank>_0.distcp`` as DCP names them."""
    return f"__{rank}_0.distcp"


class TorchDistWriter:
    """Append chunks of global tensors (and pickled objects) to per-rank DCP files.

    Call :meth:`finish` once everything is added: it checks that the chunks tile every tensor
    exactly, fsyncs the data and writes ``.metadata``, ``common.pt`` and ``metadata.json``.
    """

    def __init__(self, ckpt_dir: str | Path, background: bool = True):
        self.dir = Path(ckpt_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[int, io.BufferedWriter] = {}
        self._tensors: dict[str, TensorStorageMetadata] = {}
        self._objects: dict[str, BytesStorageMetadata] = {}
        self._storage: dict[MetadataIndex, _StorageInfo] = {}
        self._bg = BackgroundWriter() if background else None
        self.bytes_written = 0

    def _file(self, rank: int):
        if rank not in self._files:
            self._files[rank] = open(self.dir / data_file_name(rank), "wb")  # noqa: SIM115
        return self._files[rank]

    def add_chunk(
        self,
        key: str,
        global_shape: tuple[int, ...],
        offsets: tuple[int, ...],
        data: torch.Tensor,
        rank: int,
    ) -> None:
        """Write ``data`` as the block of tensor ``key`` starting at ``offsets``, in rank's file.

        ``data`` must not be modified afterwards (it may be written in the background).
        """
        if len(offsets) != len(global_shape) or data.dim() != len(global_shape):
            raise ValueError(f"{key}: chunk rank {data.dim()} vs global shape {global_shape}")
        if any(o + s > g for o, s, g in zip(offsets, data.shape, global_shape)):
            raise ValueError(
                f"{key}: chunk at {offsets} {tuple(data.shape)} exceeds {global_shape}"
            )
        data = owned_copy(data.detach().cpu())
        md = self._tensors.get(key)
        if md is None:
            md = self._tensors[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=data.dtype),
                size=torch.Size(global_shape),
                chunks=[],
            )
        elif md.properties.dtype != data.dtype or tuple(md.size) != tuple(global_shape):
            raise ValueError(f"{key}: chunks disagree on dtype or global shape")
        md.chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(data.shape)))
        index = MetadataIndex(key, offsets)
        if self._bg is None:
            self._write_tensor(index, data, rank)
        else:
            self._bg.submit(
                data.numel() * data.element_size(), self._write_tensor, index, data, rank
            )

    def _write_tensor(self, index: MetadataIndex, data: torch.Tensor, rank: int) -> None:
        f = self._file(rank)
        start = f.tell()
        with _no_crc32():
            torch.save(data, f)  # the bytes DCP's FileSystemWriter writes for one tensor item
        length = f.tell() - start
        self._storage[index] = _StorageInfo(data_file_name(rank), start, length)
        self.bytes_written += length

    def wait(self) -> None:
        """Block until every queued chunk is written (call before building a very large one)."""
        if self._bg is not None:
            self._bg.drain()

    def add_object(self, unique_key: str, obj, rank: int) -> None:
        """Write a megatron ShardedObject (stored as ``torch.save([obj])``, like megatron does)."""
        self.wait()
        buf = io.BytesIO()
        torch.save([obj], buf)
        f = self._file(rank)
        start = f.tell()
        f.write(buf.getbuffer())
        self._objects[unique_key] = BytesStorageMetadata()
        self._storage[MetadataIndex(unique_key)] = _StorageInfo(
            data_file_name(rank), start, f.tell() - start
        )
        self.bytes_written += f.tell() - start

    def _check_tiling(self) -> None:
        for key, md in self._tensors.items():
            seen = {tuple(c.offsets) for c in md.chunks}
            volume = sum(math.prod(c.sizes) for c in md.chunks)
            if len(seen) != len(md.chunks) or volume != math.prod(md.size):
                raise RuntimeError(
                    f"internal error: the chunks of {key} do not tile its {tuple(md.size)} shape"
                )

    def finish(self, common: dict) -> None:
        """Close the data files and write the metadata that makes the folder a checkpoint."""
        # The files the installed megatron-core's own save writes, plus common.pt, which every
        # supported release reads (see sfmed.core.mcore_compat).
        from sfmed.core import mcore_compat

        if mcore_compat.common_state_in_dcp():
            self.add_object(mcore_compat.COMMON_STATE_KEY, common, rank=0)
        if self._bg is not None:
            self._bg.close()
            self._bg = None
        self._check_tiling()
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._files.clear()
        metadata = Metadata(
            state_dict_metadata={**self._tensors, **self._objects},
            planner_data=None,
            storage_data=self._storage,
            storage_meta=StorageMeta(checkpoint_id=str(self.dir), save_id=str(uuid.uuid4())),
            version=CURRENT_DCP_VERSION,
        )
        with open(self.dir / DCP_METADATA, "wb") as f:
            pickle.dump(metadata, f)
            f.flush()
            os.fsync(f.fileno())
        torch.save(common, self.dir / COMMON)
        marker = mcore_compat.checkpoint_marker()  # megatron's own metadata.json, written last
        (self.dir / MARKER).write_text(json.dumps(marker))

    def abort(self) -> None:
        """Stop writing and close open files (the caller removes the folder)."""
        if self._bg is not None:
            self._bg.close(wait_for_jobs=False)
            self._bg = None
        for f in self._files.values():
            f.close()
        self._files.clear()


class _BlockPlanner:
    """The part of DCP's LoadPlanner that FileSystemReader.read_data calls: copy into one block."""

    def __init__(self, target: torch.Tensor):
        self.target = target

    def resolve_tensor(self, read_item):
        t = self.target
        for axis, (off, size) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(axis, off, size)
        return t

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor handed out a view of the target: the bytes are already in place

    def load_bytes(self, read_item, value) -> None:
        self.target = torch.load(value, weights_only=False)


class _FileSlice(io.RawIOBase):
    """A read-only window [offset, offset+length) of an open file, for torch.load."""

    def __init__(self, f, offset: int, length: int):
        self._f, self._start, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buf)[:n])
        self._pos += got
        return got


class TorchDistReader:
    """Random access to the tensors of a torch_dist checkpoint folder, whatever its TP/PP grid."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        marker = self.dir / MARKER
        if not marker.is_file():
            raise CheckpointFormatError(
                f"{self.dir} has no {MARKER}: not a megatron-core dist checkpoint folder"
            )
        try:
            config = json.loads(marker.read_text())
            backend = config["sharded_backend"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointFormatError(f"{marker} is not a valid megatron marker: {e}") from e
        if backend != BACKEND:
            raise CheckpointFormatError(
                f"{self.dir} is a {backend!r} checkpoint; sfmed reads megatron-core's "
                f"'{BACKEND}' format (Megatron-LM --ckpt-format torch_dist)"
            )
        if not (self.dir / DCP_METADATA).is_file():
            raise CheckpointFormatError(
                f"{self.dir} lacks {DCP_METADATA}: the checkpoint is incomplete"
            )
        self._fs = FileSystemReader(str(self.dir))
        try:
            self.metadata: Metadata = self._fs.read_metadata()
        except Exception as e:  # a truncated or foreign pickle
            raise CheckpointFormatError(f"cannot read {self.dir / DCP_METADATA}: {e}") from e
        self._fs.set_up_storage_reader(self.metadata, True)

    def tensor_keys(self) -> list[str]:
        """Keys of all tensors (not objects) in the checkpoint."""
        return [
            k
            for k, v in self.metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)
        ]

    def has(self, key: str) -> bool:
        """Whether ``key`` (a tensor key or a ShardedObject unique key) is stored."""
        return key in self.metadata.state_dict_metadata

    def shape(self, key: str) -> tuple[int, ...]:
        """Global shape of tensor ``key``."""
        return tuple(self._tensor_md(key).size)

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of tensor ``key``."""
        return self._tensor_md(key).properties.dtype

    def chunks(self, key: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(offsets, sizes) of the stored chunks of ``key``."""
        return [(tuple(c.offsets), tuple(c.sizes)) for c in self._tensor_md(key).chunks]

    def _tensor_md(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointFormatError(f"{self.dir} holds no tensor {key!r}")
        return md

    def check_files(self, keys: list[str]) -> None:
        """Raise if a data file behind ``keys`` is missing or shorter than the metadata says."""
        want = set(keys)
        sizes: dict[str, int] = {}
        for index, info in self.metadata.storage_data.items():
            if index.fqn not in want:
                continue
            path = self.dir / info.relative_path
            if info.relative_path not in sizes:
                sizes[info.relative_path] = path.stat().st_size if path.is_file() else -1
            size = sizes[info.relative_path]
            if size < 0:
                raise CheckpointFormatError(
                    f"{path} is missing; {index.fqn} is stored there (incomplete copy?)"
                )
            if size < info.offset + info.length:
                raise CheckpointFormatError(
                    f"{path} is truncated ({size} bytes; {index.fqn} needs bytes up to "
                    f"{info.offset + info.length}); copy the checkpoint again"
                )

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The block of tensor ``key`` at ``offsets`` of shape ``sizes`` (any chunk grid).

        A block that is exactly one stored chunk is returned as loaded (no second copy);
        anything else goes through DCP's resharding reader.
        """
        md = self._tensor_md(key)
        want = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, md, [want])
        self._will_need(items)
        info = self.metadata.storage_data.get(MetadataIndex(key, offsets))
        if (
            info is not None
            and not info.transform_descriptors
            and any(
                tuple(c.offsets) == tuple(offsets) and tuple(c.sizes) == tuple(sizes)
                for c in md.chunks
            )
        ):
            with open(self.dir / info.relative_path, "rb") as f:
                t = torch.load(_FileSlice(f, info.offset, info.length), weights_only=True)
            if tuple(t.shape) != tuple(sizes) or t.dtype != md.properties.dtype:
                raise CheckpointFormatError(f"{key}: stored chunk at {offsets} is corrupt")
            return t
        out = torch.empty(sizes, dtype=md.properties.dtype)
        covered = sum(math.prod(i.lengths) for i in items)
        if covered != math.prod(sizes):
            raise CheckpointFormatError(
                f"{key}: the stored chunks cover {covered} of the {math.prod(sizes)} elements "
                f"asked for at {offsets}; the checkpoint is incomplete"
            )
        self._fs.read_data(LoadPlan(items), _BlockPlanner(out)).wait()
        return out

    def _will_need(self, items) -> None:
        """Ask the kernel to read the stored chunks behind ``items`` in one sequential sweep.

        torch.load jumps to the end of each chunk's zip (its directory) and back, which defeats
        the kernel's sequential readahead; without the hint a cold read proceeds in small
        synchronous requests.
        """
        by_file: dict[str, list] = {}
        for item in items:
            info = self.metadata.storage_data[item.storage_index]
            by_file.setdefault(info.relative_path, []).append(info)
        for rel, infos in by_file.items():
            fd = os.open(self.dir / rel, os.O_RDONLY)
            try:
                for info in infos:
                    os.posix_fadvise(fd, info.offset, info.length, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def read_object(self, unique_key: str):
        """A stored ShardedObject's value (megatron stores a one-element list)."""
        from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

        index = MetadataIndex(unique_key)
        item = ReadItem(
            type=LoadItemType.BYTE_IO,
            dest_index=index,
            dest_offsets=torch.Size(()),
            storage_index=index,
            storage_offsets=torch.Size(()),
            lengths=torch.Size(()),
        )
        planner = _BlockPlanner(None)
        self._fs.read_data(LoadPlan([item]), planner).wait()
        return planner.target
