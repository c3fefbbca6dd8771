"""Safetensors files read and written one tensor at a time, and the Hugging Face way of splitting a
checkpoint into shards.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}`` (padded with spaces to a multiple of 8 bytes, as the library writes it), then the raw
row-major bytes of every tensor, offsets counted from the end of the header.

Why by hand, beside the ``safetensors`` library: its writers (``save_file``) take every tensor of a
file at once, so a 5 GB shard would sit in host memory whole; ``SafetensorsWriter`` writes the
header from the shapes first and then each tensor as it comes. Its reader (``safe_open``) maps the
file and copies the tensor out of the mapping, so the pages it touched count in the process's
resident memory beside the copy, twice the tensor (measured: a 1 GiB tensor raises VmHWM by
2 GiB); ``read_tensor`` reads the bytes straight into the array it returns, once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from convert.hf_layout import ConversionError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER = 100_000_000  # the library's own limit
SINGLE_FILE = "model.safetensors"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of a file: its dtype, shape and absolute byte range in the file."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _entry(path: Path, name: str, spec: Any, data_start: int, data_size: int) -> Entry:
    try:
        dtype = DTYPES[spec["dtype"]]
        shape = tuple(int(d) for d in spec["shape"])
        begin, end = (int(x) for x in spec["data_offsets"])
        if min(shape, default=0) < 0:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise ConversionError(f"{path}: tensor {name} has a malformed or unsupported header entry "
                              f"({str(spec)[:80]})") from None
    if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * dtype.itemsize:
        raise ConversionError(f"{path}: tensor {name}'s data_offsets [{begin}, {end}] do not fit "
                              f"its shape {shape} and dtype, or the file ({data_size} data bytes)")
    return Entry(dtype, shape, data_start + begin, data_start + end)


def read_header(path: Path) -> dict[str, Entry]:
    """The tensors of a safetensors file, by name (nothing else is read); ConversionError for a
    file that is not one."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < size <= MAX_HEADER:
                raise ConversionError(f"{path} is not a safetensors file (header length {size})")
            header = json.loads(f.read(size).decode("utf-8"))
            file_size = os.fstat(f.fileno()).st_size
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path} is not a readable safetensors file ({e})") from None
    except RecursionError:
        raise ConversionError(f"{path} is not a readable safetensors file (header nested too "
                              "deeply)") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path} is not a safetensors file (its header is not a JSON object)")
    return {name: _entry(path, name, spec, 8 + size, file_size - 8 - size)
            for name, spec in header.items() if name != "__metadata__"}


def read_tensor(path: Path, name: str, entry: Entry) -> np.ndarray:
    """Tensor ``name`` of ``path`` (its header ``entry``), read into a new array in its stored
    dtype: host memory is the tensor once."""
    out = np.empty(entry.shape, entry.dtype)
    try:
        with path.open("rb") as f:
            f.seek(entry.begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    except OSError as e:
        raise ConversionError(f"tensor {name} of {path} is not readable ({e})") from None
    if got != entry.nbytes:
        raise ConversionError(f"tensor {name} of {path} is truncated ({got} of {entry.nbytes} bytes)")
    return out


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor: the header (every tensor's dtype, shape and
    offsets) first, from ``specs``, then each tensor's bytes, in the order of ``specs``, as
    ``write`` receives them. ``close`` checks that every tensor came."""

    def __init__(self, path: Path, specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self.expected: list[tuple[str, np.dtype, tuple[int, ...]]] = []
        offset = 0
        for name, (dtype, shape) in specs.items():
            dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape)
            end = offset + math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            self.expected.append((name, dtype, shape))
            offset = end
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
        self.path, self._next = path, 0
        self._file = path.open("wb")
        self._file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, array: np.ndarray) -> None:
        """The next tensor's values (its dtype and shape as declared)."""
        want, dtype, shape = self.expected[self._next]
        if name != want or array.dtype != dtype or tuple(array.shape) != shape:
            raise ValueError(f"{self.path}: expected tensor {want} {dtype}{list(shape)}, got {name} "
                             f"{array.dtype}{list(array.shape)}")
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self.expected):
            raise ValueError(f"{self.path}: {len(self.expected) - self._next} tensors were not written")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is None:
            self.close()
        else:
            self._file.close()


def parse_size(text: str) -> int:
    """Bytes of a size such as ``5GB``, ``500MB``, ``2GiB`` or ``1e9`` (KB, MB, GB, TB are powers
    of 1000, as Hugging Face counts them); ValueError unless it is a positive whole number of bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    try:
        value = float(match.group(1)) * SIZE_UNITS[unit] if match else math.nan
    except (ValueError, KeyError):
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"expected a positive size such as 5GB, 500MB or 1e9 (bytes), got {text!r}")
    return int(value)


def plan_shards(sizes: Iterable[tuple[str, int]], max_bytes: int) -> dict[str, list[str]]:
    """File name -> the tensors it holds, in order, split as ``transformers``' ``save_pretrained``
    splits (huggingface_hub's ``split_state_dict_into_shards_factory``): tensors in order, a new
    file when the next one would take the current one past ``max_bytes``, a larger tensor in a file
    of its own (which here also closes the file being filled, where the hub's puts it ahead of that
    one, out of order). One file is ``model.safetensors``, several
    ``model-00001-of-00003.safetensors``..."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, size in sizes:
        if current and (size > max_bytes or current_bytes + size > max_bytes):
            shards.append(current)
            current, current_bytes = [], 0
        if size > max_bytes:
            shards.append([name])
            continue
        current.append(name)
        current_bytes += size
    if current or not shards:
        shards.append(current)
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": names
            for i, names in enumerate(shards)}
