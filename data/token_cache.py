"""Pre-tokenized documents: one split of a source tokenized once into ArrayRecord files (each record a
document's int32 ids, exactly `data.pipeline.document_ids`), keyed by a fingerprint of the source's
files and of the tokenizer, and read back by later runs on any number of processes.

The cache is written into a temporary folder and renamed into place, so a crash never leaves half of
one and concurrent writers (processes that do not share a disk with process 0) cannot mix theirs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter

from data.hf_sources import glob_and_field, matching_files, spec_parts
from data.pipeline import document_ids
from data.sources import DEFAULT_CACHE_DIR, DOC_BYTES, stdlib_files
from data.tokenizer import Tokenizer

CACHE_VERSION = 1
DOCS_PER_FILE = 1 << 16  # documents per ArrayRecord file
WRITER_OPTIONS = "group_size:1"  # one record per chunk: a random read decodes only its document
META_FILE = "meta.json"


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of what decides a document's ids: the kind, special ids and the serialized model
    (SentencePiece's model proto, a Hugging Face tokenizer.json)."""
    digest = hashlib.sha256(json.dumps([tokenizer.kind, tokenizer.vocab_size, tokenizer.bos_id,
                                        tokenizer.eos_id]).encode())
    model_proto = getattr(tokenizer, "model_proto", None)  # SentencePiece
    backend = getattr(tokenizer, "backend", None)  # Hugging Face tokenizers
    if model_proto is not None:
        digest.update(model_proto)
    if backend is not None:
        digest.update(backend.to_str().encode())
    return digest.hexdigest()[:16]


def spec_files(spec: str, data_dir: str | None) -> list[str]:
    """The files a random-access source spec reads (their paths, sizes and mtimes identify its data)."""
    kind, _, rest = spec.partition(":")
    if spec == "stdlib":
        return [str(p) for p, _ in stdlib_files()]
    if kind in ("text", "jsonl", "parquet"):
        pattern = rest if kind == "text" else glob_and_field(rest)[0]
        return [p for p, _ in matching_files(pattern, spec)]
    if kind == "hf":
        path = Path(os.path.expanduser(spec_parts(kind, rest)[0]))
        if path.is_dir():
            return sorted(str(p) for p in path.rglob("*") if p.is_file())
        return [p for p, _ in matching_files(str(path), spec)]
    if kind == "tfds":
        folder = Path(str(tfds.builder(rest.split(":")[0], data_dir=data_dir).data_dir))
        return sorted(str(p) for p in folder.rglob("*") if p.is_file())
    raise ValueError(f"data.token_cache cannot cache {spec!r}")


def source_fingerprint(spec: str, split: str, eval_fraction: float, data_dir: str | None) -> str:
    """A hash of the spec, the split and how it is held out, and the source's files (paths, sizes,
    modification times): a changed file makes a new cache."""
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in spec_files(spec, data_dir)]
    blob = json.dumps([spec, split, eval_fraction, DOC_BYTES, data_dir or "", stats])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TokenDocuments:
    """A token cache's documents: each an int32 array of ids, random access (small to pickle)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        meta = json.loads((folder / META_FILE).read_text())
        self.length = int(meta["documents"])
        paths = [str(folder / name) for name in meta["files"]]
        self.records = grain.sources.ArrayRecordDataSource(paths) if paths else []
        if len(self.records) != self.length:
            raise ValueError(f"the token cache {folder} holds {len(self.records)} documents, its "
                             f"{META_FILE} says {self.length}: delete the folder to rebuild it")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> np.ndarray:
        return np.frombuffer(self.records[index], np.int32)

    def __repr__(self) -> str:
        return f"TokenDocuments({str(self.folder)!r}, {self.length} documents)"


def write_tokens(documents: Sequence[str], tokenizer: Tokenizer, folder: Path) -> None:
    """Tokenizes ``documents`` in order into ArrayRecord files in ``folder``, atomically: written in
    a temporary sibling folder, renamed into place; a finished cache already there is kept."""
    scratch = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    scratch.mkdir(parents=True)
    try:
        count = len(documents)
        files = [f"tokens-{i:05d}-of-{-(-count // DOCS_PER_FILE):05d}.array_record"
                 for i in range(-(-count // DOCS_PER_FILE))]
        for i, name in enumerate(files):
            writer = ArrayRecordWriter(str(scratch / name), WRITER_OPTIONS)
            for index in range(i * DOCS_PER_FILE, min(count, (i + 1) * DOCS_PER_FILE)):
                writer.write(document_ids(tokenizer, documents[index]).tobytes())
            writer.close()
        meta = {"version": CACHE_VERSION, "documents": count, "files": files,
                "tokenizer": tokenizer.kind}
        (scratch / META_FILE).write_text(json.dumps(meta) + "\n")
        try:
            scratch.rename(folder)
        except OSError:  # another process finished the same cache first: keep its files
            if not (folder / META_FILE).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def cached_tokens(documents: Sequence[str], tokenizer: Tokenizer, *, spec: str, split: str,
                  eval_fraction: float, data_dir: str | None = None,
                  cache_dir: str | None = None) -> TokenDocuments:
    """``documents`` (the ``split`` of ``spec``) as token ids from the cache under ``cache_dir``
    (None or "": ``~/.cache/meshlm/tfds``), tokenized and written first when it is not there."""
    key = f"{source_fingerprint(spec, split, eval_fraction, data_dir)}-{tokenizer_fingerprint(tokenizer)}"
    folder = Path(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)) / "tokens" / key
    if not (folder / META_FILE).is_file():
        write_tokens(documents, tokenizer, folder)
    return TokenDocuments(folder)
