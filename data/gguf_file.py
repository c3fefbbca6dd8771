"""Opening GGUF files that come from elsewhere: the header (counts, lengths, value types, tensor
extents) is walked and checked against the file's size before ``gguf.GGUFReader`` reads it. The
reader trusts every count: an array that claims 2**62 items past the end of the file loops forever,
and one of 2**26 items the file does hold takes minutes and gigabytes of small objects.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path
from typing import Any

import gguf

MAX_KVS = 1 << 16  # metadata keys (real files: a few dozen)
MAX_TENSORS = 1 << 20  # tensors (real files: a few thousand)
MAX_ITEMS = 1 << 22  # array items in all (a 262,144-token vocabulary with scores, types, merges: ~1.3M)
MAX_DIMS = 4  # GGML_MAX_DIMS
HEADER_BYTES = 24  # magic, version, tensor count, key count
VALUE_BYTES = {gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.UINT16: 2,
               gguf.GGUFValueType.INT16: 2, gguf.GGUFValueType.UINT32: 4, gguf.GGUFValueType.INT32: 4,
               gguf.GGUFValueType.FLOAT32: 4, gguf.GGUFValueType.BOOL: 1, gguf.GGUFValueType.UINT64: 8,
               gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8}


class _Walk:
    """A cursor over a GGUF header that refuses anything the file cannot hold."""

    def __init__(self, data: Any, order: str) -> None:
        self.data, self.order, self.offset, self.items = data, order, 0, 0

    def take(self, size: int, what: str) -> int:
        """Skips ``size`` bytes; their start."""
        if size > len(self.data) - self.offset:
            raise ValueError(f"{what} runs past the end of the file")
        self.offset += size
        return self.offset - size

    def uint(self, size: int, what: str) -> int:
        start = self.take(size, what)
        return int.from_bytes(self.data[start:start + size], self.order)

    def string(self, what: str) -> int:
        """Skips a string; its start (after its length)."""
        size = self.uint(8, f"the length of {what}")
        return self.take(size, f"{what} ({size} bytes)")

    def name(self, what: str) -> str:
        start = self.string(what)
        return bytes(self.data[start:min(self.offset, start + 200)]).decode("utf-8", "replace")

    def value(self, kind: int, what: str) -> None:
        if kind in VALUE_BYTES:
            self.take(VALUE_BYTES[kind], what)
        elif kind == gguf.GGUFValueType.STRING:
            self.string(what)
        elif kind == gguf.GGUFValueType.ARRAY:
            item, count = self.uint(4, what), self.uint(8, what)
            self.items += count
            if self.items > MAX_ITEMS:
                raise ValueError(f"{what} makes more than {MAX_ITEMS} array items")
            if item in VALUE_BYTES:
                self.take(count * VALUE_BYTES[item], f"{what} ({count} items)")
            else:
                for _ in range(count):
                    self.value(item, what)
        else:
            raise ValueError(f"{what} has unknown value type {kind}")


def _walk_kvs(walk: _Walk, count: int) -> int:
    """Walks ``count`` metadata entries; the tensor data alignment they set (default 32)."""
    alignment = 32
    for i in range(count):
        key = walk.name(f"the name of metadata entry {i}")
        kind = walk.uint(4, f"metadata {key!r}")
        if key == "general.alignment" and kind == gguf.GGUFValueType.UINT32:
            alignment = walk.uint(4, f"metadata {key!r}")
        else:
            walk.value(kind, f"metadata {key!r}")
    if alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment} is not a power of two")
    return alignment


def _walk_tensors(walk: _Walk, count: int) -> list[tuple[str, int, int]]:
    """(name, data offset, data bytes) of ``count`` tensor descriptions."""
    out = []
    for i in range(count):
        name = walk.name(f"the name of tensor {i}")
        dims = walk.uint(4, f"tensor {name!r}")
        if dims > MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {dims} dimensions (at most {MAX_DIMS})")
        shape = [walk.uint(8, f"tensor {name!r}") for _ in range(dims)]
        kind = walk.uint(4, f"tensor {name!r}")
        if kind not in gguf.GGML_QUANT_SIZES:
            raise ValueError(f"tensor {name!r} has unknown type {kind}")
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        out.append((name, walk.uint(8, f"tensor {name!r}"), math.prod(shape) // block * block_bytes))
    return out


def check_gguf_header(data: Any) -> None:
    """ValueError unless ``data`` (a GGUF file's bytes) has a header every count, length and
    tensor extent of which fits in it, within MAX_KVS, MAX_TENSORS, MAX_ITEMS and MAX_DIMS."""
    if len(data) < HEADER_BYTES or bytes(data[:4]) != b"GGUF":
        raise ValueError("no GGUF header")
    order = "little" if int.from_bytes(data[4:8], "little") & 0xFFFF else "big"
    walk = _Walk(data, order)
    walk.take(4, "the magic")
    version, tensors, kvs = walk.uint(4, "version"), walk.uint(8, "count"), walk.uint(8, "count")
    if version not in gguf.gguf_reader.READER_SUPPORTED_VERSIONS:
        raise ValueError(f"GGUF version {version} is not supported")
    if kvs > MAX_KVS or tensors > MAX_TENSORS:
        raise ValueError(f"it claims {kvs} metadata entries and {tensors} tensors (at most "
                         f"{MAX_KVS} and {MAX_TENSORS})")
    alignment = _walk_kvs(walk, kvs)
    described = _walk_tensors(walk, tensors)
    start = -(-walk.offset // alignment) * alignment
    for name, offset, size in described:
        if start + offset + size > len(data):
            raise ValueError(f"tensor {name!r} ({size} bytes at {offset}) runs past the end of the file")


def open_gguf(path: str | os.PathLike) -> Any:
    """A ``gguf.GGUFReader`` over ``path`` once its header is checked; ValueError with one line
    for a missing file or one that is not a readable GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            check_gguf_header(data)
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from None
