"""Table sources: ``parquet:GLOB[:FIELD]`` read with pyarrow, ``hf:PATH[:SPLIT[:FIELD]]`` (a Hugging Face
``datasets`` directory or data files, random access) and ``hf-stream:PATH[:SPLIT[:FIELD]]`` (the same
data streamed: never indexed, for data too large to prepare). `data.sources.open_source` dispatches here.

A document is one row's string column FIELD (default ``text``; a null is the empty document). Without
a ``validation`` or ``test`` split, a row is held out for evaluation when the crc32 of its key and index
falls below ``eval_fraction``, as for the other sources (streamed rows have no stable index: the crc32
of their text decides).
"""

from __future__ import annotations

import glob
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import first_line

FIELD = "text"
ROW_GROUP_CACHE_BYTES = 256 << 20  # decoded row groups kept per parquet source (least recently used out)
HF_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow",
               ".csv": "csv"}  # datasets' packaged builder for each data-file suffix
EVAL_SPLITS = ("validation", "test")


def spec_parts(kind: str, rest: str) -> tuple[str, str, str]:
    """(PATH, SPLIT, FIELD) of ``hf:PATH[:SPLIT[:FIELD]]``; ValueError for more parts or no PATH."""
    parts = rest.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"bad spec '{kind}:{rest}': expected '{kind}:PATH[:SPLIT[:FIELD]]'")
    path, split, field = (parts + ["", ""])[:3]
    return path, split, field or FIELD


def glob_and_field(rest: str, default: str = FIELD) -> tuple[str, str]:
    """(GLOB, FIELD) of ``GLOB[:FIELD]``: a last part that looks like a path belongs to the glob."""
    pattern, sep, field = rest.rpartition(":")
    if not sep or not field or any(c in field for c in "/\\*?[]."):  # no FIELD given
        return rest, default
    return pattern, field


def matching_files(pattern: str, spec: str) -> list[tuple[str, str]]:
    """Files matching ``pattern`` (``**`` recursive) as (path, key): key is the path below their
    common folder. ValueError naming ``spec`` when none match."""
    paths = sorted({str(Path(p).resolve()) for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                    if Path(p).is_file()})
    if not paths:
        raise ValueError(f"{spec} matches no files")
    common = os.path.commonpath([os.path.dirname(p) for p in paths])
    return [(p, os.path.relpath(p, common)) for p in paths]


def held_out(keys: Sequence[str], counts: Sequence[int], eval_fraction: float) -> np.ndarray:
    """Which rows go to evaluation (a mask over the rows of every key in turn): row r of key k is
    named "k#r" for `held_out_names`."""
    return held_out_names((f"{k}#{r}" for k, n in zip(keys, counts, strict=True) for r in range(n)),
                          int(sum(counts)), eval_fraction)


def held_out_names(names: Iterable[str], total: int, eval_fraction: float) -> np.ndarray:
    """The rule every source holds documents out by (a mask over the ``total`` ``names``): a
    document goes to evaluation when crc32(its name) / 2**32 < eval_fraction; with two or more
    documents and eval_fraction > 0 each split gets at least one."""
    scores = np.fromiter((zlib.crc32(name.encode()) for name in names), np.uint32,
                         count=total) / 2**32
    mask = scores < eval_fraction
    if total >= 2 and eval_fraction > 0:  # never leave a split empty when it can be filled
        if not mask.any():
            mask[scores.argmin()] = True
        if mask.all():
            mask[scores.argmax()] = False
    return mask


def text_of(value: Any, where: str) -> str:
    """A string cell as a document (null: the empty one); ValueError naming ``where`` otherwise."""
    if value is None or isinstance(value, str):
        return value or ""
    raise ValueError(f"{where} holds {type(value).__name__} values, not text")


# ------------------------------------------------------------------------------ parquet via pyarrow


class ParquetDocuments:
    """Rows ``rows`` (numbered over the files' row groups in order) of one string column, random access.

    A read decodes the row's whole row group (parquet's unit of compression) and keeps it among the
    most recently used ones, up to ``ROW_GROUP_CACHE_BYTES``: cheap while the column fits; for larger
    data, ``data.token_cache`` turns the source into ArrayRecord once (one pass in row order).
    """

    def __init__(self, groups: Sequence[tuple[str, int]], group_starts: np.ndarray, rows: Any,
                 field: str, name: str) -> None:
        self.groups, self.group_starts, self.rows = list(groups), group_starts, rows
        self.field, self.name = field, name
        self._empty_cache()

    def _empty_cache(self) -> None:
        self._cache: OrderedDict[int, pa.ChunkedArray] = OrderedDict()  # row group -> its column
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # small to pickle: no decoded data, no lock
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._empty_cache()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> str:
        row = int(self.rows[index])
        group = int(np.searchsorted(self.group_starts, row, side="right")) - 1
        value = self._column(group)[row - int(self.group_starts[group])].as_py()
        return text_of(value, f"{self.groups[group][0]}: column {self.field!r}")

    def _column(self, group: int) -> pa.ChunkedArray:
        with self._lock:
            if group in self._cache:
                self._cache.move_to_end(group)
                return self._cache[group]
        path, row_group = self.groups[group]
        column = pq.ParquetFile(path, memory_map=True).read_row_group(row_group, columns=[self.field])[0]
        with self._lock:
            self._cache[group] = column
            while len(self._cache) > 1 and sum(c.nbytes for c in self._cache.values()) > \
                    ROW_GROUP_CACHE_BYTES:
                self._cache.popitem(last=False)
        return column

    def __repr__(self) -> str:
        return f"ParquetDocuments({self.name!r}, {len(self)} documents)"


def string_column(schema: pa.Schema, field: str, where: str) -> None:
    """ValueError naming ``where`` unless ``schema`` has a string column ``field``."""
    if field not in schema.names:
        raise ValueError(f"{where} has no column {field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or
            pa.types.is_string_view(kind)):
        raise ValueError(f"{where}: column {field!r} is {kind}, not a string column")


def parquet_source(rest: str, split: str, eval_fraction: float) -> ParquetDocuments:
    """The documents of ``parquet:GLOB[:FIELD]`` for ``split`` (held out by file key and row)."""
    pattern, field = glob_and_field(rest)
    files = matching_files(pattern, f"parquet:{pattern}")
    groups, starts, counts = [], [0], []
    for path, _ in files:
        try:
            meta = pq.ParquetFile(path).metadata
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path} is not a parquet file: {first_line(e)}") from None
        string_column(meta.schema.to_arrow_schema(), field, path)
        for g in range(meta.num_row_groups):
            groups.append((path, g))
            starts.append(starts[-1] + meta.row_group(g).num_rows)
        counts.append(meta.num_rows)
    mask = held_out([key for _, key in files], counts, eval_fraction)
    rows = np.flatnonzero(mask if split == "eval" else ~mask)
    return ParquetDocuments(groups, np.asarray(starts[:-1], np.int64), rows, field,
                            f"parquet:{rest}:{split}")


# --------------------------------------------------------------------- Hugging Face datasets


def load_hf(path: str, cache_dir: str, streaming: bool, spec: str) -> dict[str, Any]:
    """The splits of a ``save_to_disk`` directory, a data directory (splits from its file names) or
    data files (a glob; their suffix picks the builder), as ``datasets`` objects. Nothing downloads."""
    # datasets takes over a second to import: only runs with hf: sources pay for it.
    import datasets

    local = Path(os.path.expanduser(path))
    saved = local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "state.json"))
    if saved and streaming:
        raise ValueError(f"{spec}: a saved dataset is random access: read it with hf:")
    files = [] if local.is_dir() else [p for p, _ in matching_files(path, spec)]
    suffixes = {Path(p).suffix for p in files}
    if len(suffixes) > 1 or not suffixes <= HF_BUILDERS.keys():
        raise ValueError(f"{spec}: data files must all be one of {', '.join(HF_BUILDERS)}, got "
                         f"{', '.join(sorted(suffixes))}")
    try:
        if saved:
            loaded = datasets.load_from_disk(str(local))
        elif files:
            loaded = datasets.load_dataset(HF_BUILDERS[suffixes.pop()], data_files=files,
                                           cache_dir=cache_dir, streaming=streaming)
        else:
            loaded = datasets.load_dataset(str(local), cache_dir=cache_dir, streaming=streaming)
    except Exception as e:  # datasets raises many kinds (file not found, bad data, schema)
        raise ValueError(f"cannot read {spec}: {first_line(e)}") from None
    return dict(loaded) if isinstance(loaded, dict) else {"train": loaded}


def pick_splits(splits: dict[str, Any], given: str, spec: str) -> tuple[str, str | None]:
    """(the training split: ``given`` or ``train``, the evaluation split: validation or test, or None)."""
    train = given or "train"
    if train not in splits:
        raise ValueError(f"{spec} has no split {train!r} (splits: {', '.join(splits)})")
    return train, next((s for s in EVAL_SPLITS if s in splits and s != train), None)


class HfDocuments:
    """Rows ``rows`` of one string column of a ``datasets.Dataset`` (memory-mapped Arrow; small to
    pickle: its files' names)."""

    def __init__(self, dataset: Any, field: str, rows: Any, name: str) -> None:
        self.dataset, self.field, self.rows, self.name = dataset, field, rows, name

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> str:
        return text_of(self.dataset[int(self.rows[index])][self.field], f"{self.name}: {self.field!r}")

    def __repr__(self) -> str:
        return f"HfDocuments({self.name!r}, {len(self)} documents)"


def check_field(features: Any, field: str, spec: str) -> None:
    """ValueError unless ``features`` (None: unknown until read) has a string feature ``field``."""
    if features is None:
        return
    if field not in features:
        raise ValueError(f"{spec} has no field {field!r} (fields: {', '.join(features)})")
    if getattr(features[field], "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"{spec}: field {field!r} is {features[field]}, not text")


def hf_source(rest: str, split: str, eval_fraction: float, cache_dir: str) -> HfDocuments:
    """The documents of ``hf:PATH[:SPLIT[:FIELD]]`` for ``split``: SPLIT (default ``train``) for
    training, ``validation`` (else ``test``) for evaluation, else rows held out of SPLIT."""
    path, given, field = spec_parts("hf", rest)
    spec = f"hf:{rest}"
    splits = load_hf(path, cache_dir, False, spec)
    train, evaluation = pick_splits(splits, given, spec)
    name = evaluation if split == "eval" and evaluation else train
    dataset = splits[name]
    check_field(dataset.features, field, spec)
    dataset = dataset.select_columns([field])
    if evaluation:
        return HfDocuments(dataset, field, range(len(dataset)), f"{spec}:{name}")
    mask = held_out([train], [len(dataset)], eval_fraction)
    return HfDocuments(dataset, field, np.flatnonzero(mask if split == "eval" else ~mask),
                       f"{spec}:{split}")


# ------------------------------------------------------------------- streamed (never indexed)


class StreamedDocuments:
    """A Hugging Face streaming dataset's documents, read in order (never indexed): what to open and
    which rows to keep (``"train"`` / ``"eval"``: by the crc32 of their text; ``"all"``). The pipeline
    reads it through `data.streaming`."""

    def __init__(self, path: str, split: str, field: str, keep: str, eval_fraction: float,
                 cache_dir: str, name: str, base: Any = None) -> None:
        self.path, self.split, self.field, self.keep = path, split, field, keep
        self.eval_fraction, self.cache_dir, self.name = eval_fraction, cache_dir, name
        self._base = base

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_base": None}

    def base(self) -> Any:
        """The whole streaming split (opened once; each stream is its own copy with its own state)."""
        if self._base is None:
            self._base = load_hf(self.path, self.cache_dir, True, self.name)[self.split]
        return self._base

    def keeps(self, text: str) -> bool:
        if self.keep == "all":
            return True
        return (zlib.crc32(text.encode()) / 2**32 < self.eval_fraction) == (self.keep == "eval")

    def __repr__(self) -> str:
        return f"StreamedDocuments({self.name!r})"


def hf_stream_source(rest: str, split: str, eval_fraction: float, cache_dir: str) -> StreamedDocuments:
    """The documents of ``hf-stream:PATH[:SPLIT[:FIELD]]`` for ``split`` (splits as ``hf:``; rows held
    out by the crc32 of their text when there is no evaluation split)."""
    path, given, field = spec_parts("hf-stream", rest)
    spec = f"hf-stream:{rest}"
    splits = load_hf(path, cache_dir, True, spec)
    train, evaluation = pick_splits(splits, given, spec)
    name = evaluation if split == "eval" and evaluation else train
    check_field(splits[name].features, field, spec)
    keep = "all" if evaluation else split
    return StreamedDocuments(path, name, field, keep, eval_fraction, cache_dir, spec, splits[name])
