"""Hugging Face model folders: validated streaming reads, streaming sharded safetensors writes.

Reading goes through ``safetensors.safe_open`` (memory-mapped, one tensor or row block at a
time). Writing is streamed as well: the safetensors format puts every tensor's byte range in a
header at the start of the file, and all shapes are known before conversion, so each shard's
header is written first and the tensors are appended as they are produced (the safetensors
package only writes whole in-memory dicts, which would hold a full shard).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from sfmed.core.background import BackgroundWriter
from sfmed.core.errors import HFCheckpointError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
# Files of an HF folder that are neither weights nor their index: config, generation config,
# tokenizer, chat template, license... They travel with the checkpoint unchanged.
_NOT_SIDECAR = re.compile(
    r".*(\.index\.json|" + "|".join(re.escape(s) for s in WEIGHT_SUFFIXES) + ")$"
)

ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class HFWeights:
    """The safetensors weights of an HF model folder, checked completely before any use.

    ``expected`` maps every tensor name the model needs to its shape; ``optional`` names may be
    present (they are reported by :attr:`extra`). Raises :class:`HFCheckpointError` naming the
    file or tensor for: no weights, a missing shard or one the index names but that does not
    exist, a truncated/corrupt shard, tensors in several dtypes, a missing or misshapen tensor,
    and unknown tensors.
    """

    def __init__(
        self,
        folder: str | Path,
        expected: dict[str, tuple[int, ...]],
        optional: Iterable[str] = (),
        ignored_suffixes: tuple[str, ...] = (),
        model_class: str = "causal LM",
    ):
        from safetensors import safe_open

        self.folder = Path(folder)
        self._safe_open = safe_open
        weight_map = self._weight_map()
        files = sorted(set(weight_map.values()))
        headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                users = [k for k, v in weight_map.items() if v == name]
                raise HFCheckpointError(
                    f"{self.folder / INDEX} names shard {name} (holding e.g. {users[0]}), which is "
                    "missing; download/copy the complete model folder"
                )
            try:
                with safe_open(str(path), "pt") as f:
                    headers[name] = {
                        k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                        for k in f.keys()  # noqa: SIM118 (safe_open is not iterable)
                    }
            except Exception as e:  # safetensors raises SafetensorError (not exported stably)
                raise HFCheckpointError(
                    f"shard {path} is truncated or corrupt ({e}); download/copy it again"
                ) from e
        for k, fname in weight_map.items():
            if k not in headers[fname]:
                raise HFCheckpointError(f"{INDEX} puts {k} in {fname}, but that shard lacks it")
        self._where = dict(weight_map)
        dtypes: dict[str, str] = {}
        for k, fname in weight_map.items():
            dtypes.setdefault(headers[fname][k][0], k)
        if len(dtypes) > 1:
            (d0, k0), (d1, k1) = list(dtypes.items())[:2]
            raise HFCheckpointError(
                f"tensors in different dtypes: {k0} is {d0} ({weight_map[k0]}) but {k1} is {d1} "
                f"({weight_map[k1]}); re-save the model in one dtype (e.g. "
                "model.to(torch.bfloat16).save_pretrained(...))"
            )
        st_dtype = next(iter(dtypes)) if dtypes else "F32"
        if st_dtype not in ST_DTYPES or not ST_DTYPES[st_dtype].is_floating_point:
            raise HFCheckpointError(f"weights are stored as {st_dtype}, not a float dtype")
        self.dtype: torch.dtype = ST_DTYPES[st_dtype]
        missing = [k for k in expected if k not in weight_map]
        if missing:
            raise HFCheckpointError(
                f"{len(missing)} tensor(s) the config.json implies are missing from "
                f"{self.folder}, e.g. {missing[:3]} (is a shard missing from the index, or does "
                "config.json belong to another model?)"
            )
        for k, shape in expected.items():
            got = headers[weight_map[k]][k][1]
            if got != tuple(shape):
                raise HFCheckpointError(
                    f"{k} has shape {list(got)} in {weight_map[k]} but config.json implies "
                    f"{list(shape)}; config.json and weights disagree"
                )
        optional = set(optional)
        unknown = [
            k
            for k in weight_map
            if k not in expected and k not in optional and not k.endswith(ignored_suffixes)
        ]
        if unknown:
            raise HFCheckpointError(
                f"{len(unknown)} tensor(s) that {model_class} does not have, e.g. {unknown[:3]}; "
                f"this folder is not a plain {model_class} checkpoint"
            )
        self.extra = sorted(k for k in weight_map if k in optional)
        self.total_bytes = sum(
            _numel(headers[f][k][1]) * self.dtype.itemsize for k, f in weight_map.items()
        )

    def _weight_map(self) -> dict[str, str]:
        if not self.folder.is_dir():
            raise HFCheckpointError(f"src={self.folder} is not a folder")
        index = self.folder / INDEX
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                weight_map = dict(data["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise HFCheckpointError(f"{index} is not a valid safetensors index: {e}") from e
            return weight_map
        from safetensors import safe_open

        files = [SINGLE] if (self.folder / SINGLE).is_file() else []
        files = files or sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            other = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt"))
            hint = (
                f" (found {other[:2]}: re-save with save_pretrained(..., safe_serialization=True))"
                if other
                else ""
            )
            raise HFCheckpointError(f"no *.safetensors weights in {self.folder}{hint}")
        weight_map: dict[str, str] = {}
        for name in files:
            try:
                with safe_open(str(self.folder / name), "pt") as f:
                    for k in f.keys():  # noqa: SIM118
                        if k in weight_map:
                            raise HFCheckpointError(
                                f"{k} is in both {weight_map[k]} and {name} and there is no "
                                f"{INDEX} saying which to use"
                            )
                        weight_map[k] = name
            except HFCheckpointError:
                raise
            except Exception as e:
                raise HFCheckpointError(
                    f"shard {self.folder / name} is truncated or corrupt ({e}); download/copy it "
                    "again"
                ) from e
        return weight_map

    def _open(self, name: str):
        # A fresh handle per read: safetensors hands out tensors backed by its memory map, and
        # every page touched through a long-lived map would stay counted in the process's RSS.
        return self._safe_open(str(self.folder / self._where[name]), "pt")

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (memory-mapped; its pages are released once it is dropped)."""
        with self._open(name) as f:
            return f.get_tensor(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name``; only those bytes are read."""
        with self._open(name) as f:
            return f.get_slice(name)[start:stop]

    def close(self) -> None:
        """Nothing stays open between reads; kept for symmetry with the writers."""


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class SafetensorsWriter:
    """Write tensors, in a fixed order, into sharded safetensors files plus the HF index.

    ``specs`` lists (name, shape, dtype) in the order :meth:`write` will be called. Shards are
    cut greedily at ``max_shard_bytes`` like transformers does; a single shard is named
    ``model.safetensors`` and needs no index. A tensor may arrive in several row blocks.
    """

    def __init__(
        self,
        folder: str | Path,
        specs: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int,
    ):
        self.folder = Path(folder)
        self.specs = [(n, tuple(s), d) for n, s, d in specs]
        shards: list[list[int]] = [[]]
        size = 0
        for i, (_, shape, dtype) in enumerate(self.specs):
            nbytes = _numel(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += nbytes
        n = len(shards)
        self.shard_names = (
            [SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        )
        self._shard_of = {i: k for k, idx in enumerate(shards) for i in idx}
        self._shards = shards
        self._next = 0  # index into specs of the tensor being written
        self._done_bytes = 0  # bytes of that tensor written so far
        self._file = None
        self._shard = -1  # shard the main thread is at (the writer thread follows in order)
        self._bg = BackgroundWriter()
        self.total_bytes = sum(_numel(s) * d.itemsize for _, s, d in self.specs)

    def _open_shard(self, k: int) -> None:
        self._close_file()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in self._shards[k]:
            name, shape, dtype = self.specs[i]
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {
                "dtype": ST_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
        self._file = open(self.folder / self.shard_names[k], "wb")  # noqa: SIM115
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (all of tensor ``name``, or its next block of rows).

        The bytes are written by a background thread: ``tensor`` must not change afterwards.
        """
        if self._next >= len(self.specs):
            raise RuntimeError(f"internal error: {name} written after all planned tensors")
        want, shape, dtype = self.specs[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape[1:]) != shape[1:]:
            raise RuntimeError(
                f"internal error: got {name} {tuple(tensor.shape)} {tensor.dtype}, expected the "
                f"next block of {want} {shape} {dtype}"
            )
        k = self._shard_of[self._next]
        if k != self._shard:
            self._bg.submit(0, self._open_shard, k)
            self._shard = k
        data = tensor.detach().cpu().contiguous()
        nbytes = data.numel() * data.element_size()
        if nbytes:
            self._bg.submit(nbytes, self._write_bytes, data)
        self._done_bytes += nbytes
        full = _numel(shape) * dtype.itemsize
        if self._done_bytes > full:
            raise RuntimeError(f"internal error: more bytes than {shape} for {name}")
        if self._done_bytes == full:
            self._next += 1
            self._done_bytes = 0

    def _write_bytes(self, data: torch.Tensor) -> None:
        self._file.write(memoryview(data.view(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        """Finish the last shard (fsync) and write the index when there are several shards."""
        if self._next != len(self.specs):
            raise RuntimeError(
                f"internal error: only {self._next} of {len(self.specs)} tensors were written"
            )
        self._bg.close()
        self._close_file()
        if len(self.shard_names) > 1:
            weight_map = {
                n: self.shard_names[self._shard_of[i]] for i, (n, _, _) in enumerate(self.specs)
            }
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def abort(self) -> None:
        """Stop writing and close the open shard (the caller removes the folder)."""
        self._bg.close(wait_for_jobs=False)
        if self._file is not None:
            self._file.close()
            self._file = None


def sidecar_files(folder: str | Path) -> list[Path]:
    """The non-weight files of an HF folder (config, generation config, tokenizer, license...)."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and not _NOT_SIDECAR.match(p.name)
    )


def copy_sidecar(src: str | Path, dst: str | Path, skip: Iterable[str] = ()) -> list[str]:
    """Copy :func:`sidecar_files` of ``src`` into ``dst``; returns the copied names."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    skip = set(skip)
    copied = []
    for p in sidecar_files(src):
        if p.name in skip:
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied
