"""Text sources as random-access collections of documents (``str``), chosen by a spec string:

- ``stdlib``: this Python installation's standard library ``.py`` files (a corpus every machine has);
- ``text:GLOB``: local UTF-8 text files, prepared once into ArrayRecord by a tensorflow-datasets
  builder (`MeshlmText`) under a cache directory and reused while the files are unchanged;
- ``jsonl:GLOB[:FIELD]``: local JSON-lines files, one document per line (its string FIELD, default
  ``text``), prepared the same way (`MeshlmJsonl`);
- ``tfds:NAME[:SPLIT[:FIELD]]``: a tfds dataset already prepared as ArrayRecord (nothing downloads);
- ``parquet:GLOB[:FIELD]``, ``hf:PATH[:SPLIT[:FIELD]]``, ``hf-stream:PATH[:SPLIT[:FIELD]]``: tables
  through pyarrow and Hugging Face ``datasets`` (`data.hf_sources`).

Every source but ``hf-stream:`` (streamed, never indexed) satisfies grain's ``RandomAccessDataSource``
(``__len__``, ``__getitem__``, picklable). Tokenizing, shuffling and packing belong to the pipeline.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import tensorflow_datasets as tfds

from core.errors import first_line
from data.hf_sources import (
    StreamedDocuments,
    glob_and_field,
    held_out_names,
    hf_source,
    hf_stream_source,
    parquet_source,
)

DOC_BYTES = 64 * 1024  # a file is cut into documents of at most this many bytes, at line ends
DEFAULT_CACHE_DIR = "~/.cache/meshlm/tfds"
SPEC_HELP = ("expected 'stdlib', 'text:GLOB', 'jsonl:GLOB[:FIELD]', 'tfds:NAME[:SPLIT[:FIELD]]', "
             "'parquet:GLOB[:FIELD]', 'hf:PATH[:SPLIT[:FIELD]]' or 'hf-stream:PATH[:SPLIT[:FIELD]]'")
JSONL_FIELD = "text"
Split = Literal["train", "eval"]


class DocumentSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> str: ...


def open_source(spec: str, split: Split, *, eval_fraction: float = 0.05, data_dir: str | None = None,
                cache_dir: str | None = None) -> DocumentSource | StreamedDocuments:
    """The ``split`` documents of the source named by ``spec``.

    ``stdlib`` and ``text:``: files are cut into documents of at most 64 KiB at line ends; a document
    is held out for ``eval`` when the crc32 of its file's relative path and chunk index falls below
    ``eval_fraction`` (and, whenever there are two or more documents and ``eval_fraction > 0``, each
    split gets at least one). The splits are disjoint and together hold all the text.
    ``jsonl:``: one document per non-blank line, held out by the crc32 of its file's relative path
    and line number (as above).
    ``tfds:``: ``train`` reads the ``train`` split and ``eval`` the ``validation`` (else ``test``) split;
    with neither, every k-th record of ``train`` (k = round(1 / eval_fraction)) is held out instead.
    An explicit SPLIT is read for both. FIELD defaults to ``text`` (or the only text feature).
    ``parquet:``, ``hf:``, ``hf-stream:``: see `data.hf_sources`.
    ``data_dir`` is the tfds data directory for ``tfds:`` (None or "": tfds's default); ``cache_dir``
    (None or "": ``~/.cache/meshlm/tfds``) holds the prepared ``text:`` and ``hf:`` datasets.
    ValueError, with a one-line message, for an unknown spec, a glob matching no file, a non-UTF-8
    file, a JSON line or table without a string FIELD, an unknown or unprepared dataset or split.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    kind, _, rest = spec.partition(":")
    if spec == "stdlib":
        return stdlib_source(split, eval_fraction)
    if kind == "text" and rest:
        return text_source(rest, split, eval_fraction, cache_dir)
    if kind == "jsonl" and rest:
        return jsonl_source(rest, split, eval_fraction, cache_dir)
    if kind == "tfds" and rest:
        return tfds_source(rest, split, eval_fraction, data_dir or None)
    if kind == "parquet" and rest:
        return parquet_source(rest, split, eval_fraction)
    if kind in ("hf", "hf-stream") and rest:  # datasets prepares data files under cache_dir/hf
        hf_cache = os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR), "hf")
        return (hf_source if kind == "hf" else hf_stream_source)(rest, split, eval_fraction, hf_cache)
    if kind == "chat":
        raise ValueError(f"{spec!r} holds conversations: open it with its tokenizer "
                         "(data.documents.open_documents)")
    raise ValueError(f"unknown data source {spec!r}: {SPEC_HELP}")


# ------------------------------------------------------------------------- files cut into documents


@dataclass(frozen=True)
class DocRef:
    """Document ``index`` of a file: bytes ``start:end`` of ``path``; ``key`` is the file's stable name."""

    path: str
    key: str
    index: int
    start: int
    end: int


def document_spans(raw: bytes, limit: int = DOC_BYTES) -> list[tuple[int, int]]:
    """Byte spans cutting ``raw`` into pieces of at most ``limit`` bytes after a newline, or, for a
    line longer than ``limit``, at a UTF-8 character boundary. The spans tile ``raw`` exactly."""
    spans, start = [], 0
    while start < len(raw):
        end = len(raw)
        if end - start > limit:
            newline = raw.rfind(b"\n", start, start + limit)
            end = newline + 1 if newline >= 0 else start + limit
            while newline < 0 and end > start + 1 and raw[end] & 0xC0 == 0x80:  # inside a character
                end -= 1
        spans.append((start, end))
        start = end
    return spans


def file_documents(files: Sequence[tuple[Path, str]], *, skip_non_utf8: bool = False) -> list[DocRef]:
    """All documents of ``files`` (``(path, key)`` pairs); ValueError naming a non-UTF-8 file unless
    ``skip_non_utf8``."""
    docs = []
    for path, key in files:
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if skip_non_utf8:
                continue
            raise ValueError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None
        docs += [DocRef(str(path), key, i, s, e) for i, (s, e) in enumerate(document_spans(raw))]
    return docs


def split_documents(docs: Sequence[DocRef], eval_fraction: float) -> dict[Split, list[DocRef]]:
    """Disjoint ``train`` / ``eval`` lists covering ``docs``, decided by a stable hash of each document."""
    held_out = held_out_names((f"{d.key}#{d.index}" for d in docs), len(docs), eval_fraction)
    return {"train": [d for d, h in zip(docs, held_out, strict=True) if not h],
            "eval": [d for d, h in zip(docs, held_out, strict=True) if h]}


class FileDocuments:
    """Documents read on demand from byte ranges of local files (small to pickle: paths and offsets)."""

    def __init__(self, docs: Sequence[DocRef], name: str) -> None:
        self.docs = list(docs)
        self.name = name

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index: int) -> str:
        doc = self.docs[index]
        with open(doc.path, "rb") as f:
            f.seek(doc.start)
            return f.read(doc.end - doc.start).decode("utf-8")

    def __repr__(self) -> str:
        return f"FileDocuments({self.name!r}, {len(self)} documents)"


def stdlib_files() -> list[tuple[Path, str]]:
    """The standard library's .py files (site-packages excluded) with their paths relative to it."""
    return list(_stdlib_files())


@functools.cache  # listed once per process: every start of a run asks for it (train and eval split)
def _stdlib_files() -> tuple[tuple[Path, str], ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for directory, subdirs, names in os.walk(root):
        # site-packages is never walked: it is most of the tree (50,000 of 59,000 entries here)
        subdirs[:] = [d for d in subdirs if d != "site-packages"]
        found.extend(Path(directory, name) for name in names if name.endswith(".py"))
    files = sorted(p for p in found if p.is_file())
    return tuple((p, p.relative_to(root).as_posix()) for p in files)


def stdlib_source(split: Split, eval_fraction: float) -> FileDocuments:
    """The standard library's sources (its few non-UTF-8 test files left out)."""
    docs = file_documents(stdlib_files(), skip_non_utf8=True)
    return FileDocuments(split_documents(docs, eval_fraction)[split], f"stdlib:{split}")


# ------------------------------------------------------------------------ local text through tfds


class MeshlmText(tfds.core.GeneratorBasedBuilder):
    """Local UTF-8 text files as a tfds dataset (``train`` and ``validation`` splits of documents).

    Built with ``files`` (``(path, key)`` pairs) and ``eval_fraction`` to prepare it; constructed
    without them (as ``tfds.builder("meshlm_text", data_dir=...)`` does) it reads what is prepared.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Documents of at most 64 KiB cut at line ends."}
    DESCRIPTION = "Local UTF-8 text files."

    def __init__(self, *, files: Sequence[tuple[Path, str]] = (), eval_fraction: float = 0.05,
                 **kwargs: Any) -> None:
        self._files = list(files)
        self._eval_fraction = eval_fraction
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                     features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _documents(self) -> list[DocRef]:
        return file_documents(self._files)

    def _text(self, raw: bytes, doc: DocRef) -> str:
        return raw.decode("utf-8")

    def _split_generators(self, dl_manager: Any) -> dict:
        if not self._files:
            raise ValueError(f"{type(self).__name__} needs files to prepare a dataset")
        splits = split_documents(self._documents(), self._eval_fraction)
        names = {"train": "train", "eval": "validation"}
        return {names[s]: self._generate_examples(docs) for s, docs in splits.items() if docs}

    def _generate_examples(self, docs: Sequence[DocRef]):  # noqa: ANN202 (a generator of examples)
        for doc in docs:
            with open(doc.path, "rb") as f:
                f.seek(doc.start)
                raw = f.read(doc.end - doc.start)
            yield f"{doc.key}#{doc.index}", {"text": self._text(raw, doc)}


def text_files(pattern: str) -> list[tuple[Path, str]]:
    """Files matching ``pattern`` (``**`` recursive), keyed by their path below their common folder."""
    paths = sorted({Path(p).resolve() for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                    if Path(p).is_file()})
    if not paths:
        raise ValueError(f"text:{pattern} matches no files")
    common = Path(os.path.commonpath([p.parent for p in paths]))
    return [(p, p.relative_to(common).as_posix()) for p in paths]


def fingerprint(files: Sequence[tuple[Path, str]], eval_fraction: float) -> str:
    """A hash of the files (paths, sizes, mtimes) and of how they are split: the prepared data's name."""
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p, _ in files]
    blob = json.dumps([stats, eval_fraction, DOC_BYTES, str(MeshlmText.VERSION)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_text(pattern: str, eval_fraction: float, cache_dir: str | None = None) -> MeshlmText:
    """The `MeshlmText` builder for ``pattern``, prepared (once) under ``cache_dir``."""
    files = text_files(pattern)
    root = Path(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
    builder = MeshlmText(files=files, eval_fraction=eval_fraction, file_format="array_record",
                         data_dir=root / f"text-{fingerprint(files, eval_fraction)}")
    builder.download_and_prepare()  # a no-op when already prepared
    return builder


def text_source(pattern: str, split: Split, eval_fraction: float, cache_dir: str | None) -> DocumentSource:
    """The documents of ``text:PATTERN`` for ``split``, read from the prepared ArrayRecord files."""
    builder = prepare_text(pattern, eval_fraction, cache_dir)
    tfds_split = "train" if split == "train" else "validation"
    if tfds_split not in builder.info.splits:  # a single document, or eval_fraction == 0
        return FileDocuments([], f"text:{pattern}:{split}")
    return TfdsDocuments(builder.as_data_source(split=tfds_split), "text")


# ------------------------------------------------------------------------- JSON lines through tfds


def jsonl_text(line: bytes, field: str, where: str) -> str:
    """The string ``field`` of one JSON-lines record; ValueError naming ``where`` (file:line)."""
    try:
        record = json.loads(line)
    except ValueError:  # invalid JSON or not UTF-8
        raise ValueError(f"{where} is not a JSON object (invalid JSON)") from None
    if not isinstance(record, dict) or field not in record:
        raise ValueError(f"{where} has no field {field!r}")
    if not isinstance(record[field], str):
        raise ValueError(f"{where}: field {field!r} is not a string")
    return record[field]


def jsonl_documents(files: Sequence[tuple[Path, str]], field: str) -> list[DocRef]:
    """One document per non-blank line of ``files`` (its byte span; ``index`` is the line number),
    every line checked to be a JSON object with a string ``field``."""
    docs = []
    for path, key in files:
        offset = 0
        for number, line in enumerate(path.read_bytes().splitlines(keepends=True), 1):
            if line.strip():
                jsonl_text(line, field, f"{path}:{number}")
                docs.append(DocRef(str(path), key, number, offset, offset + len(line)))
            offset += len(line)
    return docs


class MeshlmJsonl(MeshlmText):
    """Local JSON-lines files as a tfds dataset: one ``text`` document per line, from its ``field``
    (``train`` and ``validation`` splits); like `MeshlmText`, constructed without files it reads
    what is prepared."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One document per JSON line."}
    DESCRIPTION = "Local JSON-lines files."

    def __init__(self, *, files: Sequence[tuple[Path, str]] = (), field: str = JSONL_FIELD,
                 eval_fraction: float = 0.05, **kwargs: Any) -> None:
        self._field = field
        super().__init__(files=files, eval_fraction=eval_fraction, **kwargs)

    def _documents(self) -> list[DocRef]:
        return jsonl_documents(self._files, self._field)

    def _text(self, raw: bytes, doc: DocRef) -> str:
        return jsonl_text(raw, self._field, doc.path)


def jsonl_source(rest: str, split: Split, eval_fraction: float, cache_dir: str | None) -> DocumentSource:
    """The documents of ``jsonl:GLOB[:FIELD]`` for ``split``, read from prepared ArrayRecord files."""
    pattern, field = glob_and_field(rest, JSONL_FIELD)
    try:
        files = text_files(pattern)
    except ValueError:
        raise ValueError(f"jsonl:{pattern} matches no files") from None
    digest = hashlib.sha256(json.dumps([fingerprint(files, eval_fraction), field,
                                        str(MeshlmJsonl.VERSION)]).encode()).hexdigest()[:16]
    root = Path(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
    builder = MeshlmJsonl(files=files, field=field, eval_fraction=eval_fraction,
                          file_format="array_record", data_dir=root / f"jsonl-{digest}")
    builder.download_and_prepare()  # a no-op when already prepared
    tfds_split = "train" if split == "train" else "validation"
    if tfds_split not in builder.info.splits:  # a single document, or eval_fraction == 0
        return FileDocuments([], f"jsonl:{rest}:{split}")
    return TfdsDocuments(builder.as_data_source(split=tfds_split), "text")


# ----------------------------------------------------------------------------------- tfds datasets


class TfdsDocuments:
    """One text field of a tfds data source, optionally every k-th record (``held_out``) or the others."""

    def __init__(self, source: Sequence, field: str, stride: int = 0, held_out: bool = False) -> None:
        self.source, self.field, self.stride, self.held_out = source, field, stride, held_out
        every_kth = (len(source) + stride - 1) // stride if stride else 0
        self.length = every_kth if held_out else len(source) - every_kth

    def __len__(self) -> int:
        return self.length

    def record_index(self, index: int) -> int:
        index = index + self.length if index < 0 else index
        if not 0 <= index < self.length:
            raise IndexError(f"document {index} out of range ({self.length} documents)")
        k = self.stride
        if not k:
            return index
        return index * k if self.held_out else index // (k - 1) * k + index % (k - 1) + 1

    def __getitem__(self, index: int) -> str:
        value = self.source[self.record_index(int(index))][self.field]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    def __repr__(self) -> str:
        return f"TfdsDocuments({self.source!r}, {self.field!r}, stride={self.stride}, {self.held_out})"


def tfds_source(rest: str, split: Split, eval_fraction: float, data_dir: str | None) -> DocumentSource:
    """The documents of ``tfds:REST`` for ``split`` (see `open_source`)."""
    parts = rest.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"bad tfds spec 'tfds:{rest}': expected 'tfds:NAME[:SPLIT[:FIELD]]'")
    name, given_split, field = (parts + ["", ""])[:3]
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises many kinds (not found, bad config, import errors)
        raise ValueError(f"unknown tfds dataset {name!r}: {first_line(e)}") from None
    if not builder.is_prepared():
        raise ValueError(f"tfds dataset {name!r} is not prepared in {builder.data_dir} (nothing is "
                         f"downloaded here: run `tfds build {name} --file_format=array_record` first)")
    field = text_field(builder, name, field)
    splits = list(builder.info.splits)
    eval_split = next((s for s in ("validation", "test") if s in splits), None)
    if given_split:  # read as given, for train and eval alike
        return open_tfds(name, given_split, data_dir, splits, field)
    if eval_split:
        return open_tfds(name, eval_split if split == "eval" else "train", data_dir, splits, field)
    if not eval_fraction:  # only a train split, and nothing to hold out of it
        return open_tfds(name, "train", data_dir, splits, field) if split == "train" else \
            FileDocuments([], f"tfds:{rest}:eval")
    stride = max(2, round(1 / eval_fraction))  # hold out every k-th train record
    return open_tfds(name, "train", data_dir, splits, field, stride, held_out=split == "eval")


def open_tfds(name: str, tfds_split: str, data_dir: str | None, splits: list[str], field: str,
              stride: int = 0, held_out: bool = False) -> TfdsDocuments:
    """``tfds.data_source`` for one split (never downloading), as documents of ``field``."""
    try:
        source = tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False)
    except Exception as e:
        raise ValueError(f"cannot read split {tfds_split!r} of tfds dataset {name!r} (splits: "
                         f"{', '.join(splits)}): {first_line(e)}") from None
    return TfdsDocuments(source, field, stride, held_out)


def text_field(builder: tfds.core.DatasetBuilder, name: str, field: str) -> str:
    """``field``, or the default text field (``text``, else the only Text feature); ValueError if absent."""
    features = builder.info.features
    texts = [k for k, v in features.items() if isinstance(v, tfds.features.Text)]
    field = field or (texts[0] if len(texts) == 1 else "text")
    if field not in texts:
        kind = "is not a text field" if field in features else "has no field"
        raise ValueError(f"tfds dataset {name!r} {kind} {field!r} "
                         f"(text fields: {', '.join(texts) or 'none'})")
    return field
