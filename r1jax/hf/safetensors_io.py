"""Lazy, sliceable reads of a directory of .safetensors files, and a streaming writer.

Why not `safetensors.safe_open(..).get_slice`: its numpy backend cannot represent bfloat16 or float8 (the
dtypes of real checkpoints: Qwen/Llama ship bf16, DeepSeek-V3 fp8), and its torch backend would make torch a
runtime dependency. The format is simple and stable (8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then raw little-endian bytes), so a read-only `np.memmap` per file gives the
same lazy slicing: indexing it copies only the requested elements, and the OS reads only the pages they touch.
ml_dtypes (a JAX dependency) supplies bfloat16 / float8 for numpy.

Writing is streamed for the same reason the reads are lazy: the header needs only names, dtypes and shapes, so it
is written first and each tensor's bytes are produced (and freed) one at a time.
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"

Ranges = Sequence[tuple[int, int]]  # one [start, stop) per axis


class CheckpointError(ValueError):
    """The checkpoint does not match what the model needs (missing / extra tensors, wrong shapes, bad files)."""


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class TensorInfo:
    __slots__ = ("name", "file", "dtype", "shape", "start", "stop")

    def __init__(self, name, file, dtype, shape, start, stop):
        self.name, self.file, self.dtype, self.shape, self.start, self.stop = name, file, dtype, shape, start, stop


class SafetensorsDir:
    """All tensors of a checkpoint directory: `model.safetensors.index.json` when present (its files only), else
    every `*.safetensors` in the directory. Files are memory-mapped once and kept for the reader's lifetime."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({os.path.join(path, v) for v in weight_map.values()})
            missing = [p for p in files if not os.path.exists(p)]
            if missing:
                raise CheckpointError(f"{index} lists shard files that do not exist: {missing[:5]}")
        else:
            weight_map = None
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files (and no {INDEX_FILE})")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            header, base = _read_header(file)
            for name, h in header.items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name!r} appears in both {self.tensors[name].file} and {file}")
                if h["dtype"] not in DTYPES:
                    raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {h['dtype']!r}")
                a, b = h["data_offsets"]
                self.tensors[name] = TensorInfo(name, file, DTYPES[h["dtype"]], tuple(h["shape"]), base + a, base + b)
        if weight_map is not None:
            absent = [n for n in weight_map if n not in self.tensors]
            if absent:
                raise CheckpointError(f"{index} maps tensors that its shard files do not contain: {absent[:5]}")
        self._maps: dict[str, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str, ranges: Ranges | None = None) -> np.ndarray:
        """The block `ranges` ([start, stop) per axis; None = all) of tensor `name`, in its stored dtype."""
        t = self.tensors[name]
        mm = self._maps.get(t.file)
        if mm is None:
            mm = self._maps[t.file] = np.memmap(t.file, dtype=np.uint8, mode="r")
        arr = mm[t.start:t.stop].view(t.dtype).reshape(t.shape)
        if ranges is None:
            return np.array(arr)
        return np.array(arr[tuple(slice(a, b) for a, b in ranges)])


# ------------------------------------------------------------------------------------------------ write

def plan_shards(entries: Sequence[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Group entries (in order) into shards of at most max_shard_bytes (a larger single tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(entries):
        n = math.prod(shape) * np.dtype(dtype).itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def write_file(path: str, entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
               produce: Callable[[int], np.ndarray], metadata: dict | None = None) -> None:
    """Write one .safetensors file: the header from `entries` (name, shape, dtype), then `produce(i)` for each
    entry in order, each array checked against its declared shape/dtype and dropped once written."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in entries:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec pads the header to a multiple of 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, (name, shape, dtype) in enumerate(entries):
            arr = produce(i)
            if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise CheckpointError(f"writing {name}: produced {arr.shape} {arr.dtype}, declared {shape} {dtype}")
            f.write(np.ascontiguousarray(arr).tobytes())


def write_dir(path: str, entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
              produce: Callable[[int], np.ndarray], max_shard_bytes: int) -> list[str]:
    """Write entries as `model.safetensors`, or as `model-0000k-of-0000n.safetensors` + index when they exceed
    max_shard_bytes. Returns the file names written."""
    shards = plan_shards(entries, max_shard_bytes)
    names = shard_names(len(shards))
    will_write = names + ([INDEX_FILE] if len(shards) > 1 else [])
    stale = stale_files(path, will_write)
    if stale:
        raise CheckpointError(f"{path} already holds {stale}, which this write would not replace; "
                              "write into an empty directory")
    weight_map = {}
    for fname, idx in zip(names, shards):
        write_file(os.path.join(path, fname), [entries[i] for i in idx], lambda j, idx=idx: produce(idx[j]))
        weight_map.update({entries[i][0]: fname for i in idx})
    if len(shards) > 1:
        total = sum(math.prod(s) * np.dtype(d).itemsize for _, s, d in entries)
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def shard_names(n_shards: int) -> list[str]:
    return ["model.safetensors"] if n_shards == 1 else [f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
                                                        for k in range(n_shards)]


def stale_files(path: str, will_write: Iterable[str]) -> list[str]:
    """Safetensors files / index already in `path` that a write of `will_write` would leave behind: a later
    load would mix them in, so the writer refuses rather than delete files it did not create."""
    old = [os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors"))]
    if os.path.exists(os.path.join(path, INDEX_FILE)):
        old.append(INDEX_FILE)
    return sorted(set(old) - set(will_write))
