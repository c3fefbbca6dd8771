"""Where a run's files live: a local (or mounted) directory, or a bucket of an object store named by
URL (``gs://bucket/run``, ``s3://bucket/run``). Local paths stay ``pathlib.Path``s; a URL becomes an
``etils.epath.Path`` (fsspec underneath: gcsfs, s3fs), which reads, writes, lists and deletes with
the same methods. What an object store lacks, this module supplies: there are no directories (a
``mkdir`` is a no-op, a prefix exists once an object is under it) and no rename (a single PUT is the
atomic write; moving a tree is a copy and a delete).

Only ``gs://`` and ``s3://`` are accepted: Orbax writes the arrays of a checkpoint through
TensorStore, whose key-value drivers are the local file, GCS and S3 (``train/orbax_s3.py`` teaches
Orbax the last). An S3-compatible server other than AWS is named the way every AWS client names it:
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (botocore, s3fs and TensorStore's spec all use it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import IO, Any

import fsspec
from etils import epath

REMOTE_SCHEMES = ("gs", "s3")
# A run path: a local directory or an object-store prefix, with pathlib's methods either way.
RunPath = Path | epath.Path


def scheme_of(path: str | os.PathLike) -> str:
    """``"s3"`` for ``s3://bucket/key``; ``""`` for a local path."""
    text = os.fspath(path)
    scheme, sep, _ = text.partition("://")
    return scheme if sep else ""


def is_remote(path: str | os.PathLike) -> bool:
    return bool(scheme_of(path))


def run_path(path: str | os.PathLike) -> RunPath:
    """``path`` as a path object: ``epath.Path`` for an object-store URL, else ``pathlib.Path``."""
    if not is_remote(path):
        return Path(path)
    _configure(scheme_of(path))
    return epath.Path(os.fspath(path))


def _configure(scheme: str) -> None:
    """fsspec's options for ``scheme``, set before a filesystem object is made (fsspec caches one
    per set of options). Listings are not cached: objects written by TensorStore (Orbax's arrays)
    or by another process never reach that cache, so a cached listing would miss them. An S3
    endpoint from the environment is passed on explicitly, so that a changed one makes a new
    filesystem object rather than reusing one bound to the old."""
    options = fsspec.config.conf.setdefault(scheme, {})
    options["use_listings_cache"] = False
    if scheme == "s3":
        options.pop("endpoint_url", None)
        if endpoint := s3_endpoint():
            options["endpoint_url"] = endpoint


def check_run_url(text: str) -> str:
    """The problem with ``text`` as a run directory, or ``""`` (a local path has none here)."""
    scheme = scheme_of(text)
    if not scheme:
        return ""
    if scheme not in REMOTE_SCHEMES:
        return (f"{text!r}: {scheme}:// is not supported; a run directory is a local or mounted path, "
                "gs://BUCKET/PATH or s3://BUCKET/PATH (Orbax writes checkpoints through TensorStore, "
                "which knows these stores)")
    if not text.partition("://")[2].split("/", 1)[0]:
        return f"{text!r} names no bucket ({scheme}://BUCKET/PATH)"
    return ""


def s3_endpoint() -> str | None:
    """The S3 endpoint AWS's clients use when it is not AWS (``AWS_ENDPOINT_URL_S3`` first)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(path: RunPath) -> tuple[Any, str]:
    """(the fsspec filesystem, the path in its terms: ``bucket/key`` without the scheme)."""
    _configure(scheme_of(path))
    return fsspec.core.url_to_fs(os.fspath(path))


def write_atomically(path: RunPath, data: bytes) -> None:
    """Writes ``path`` so that a crash leaves the old or the new contents. Locally: a temporary file,
    fsync and a rename. On an object store: one upload (a PUT, or a multipart upload, becomes
    visible whole when it completes; there is no rename to use)."""
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def file_sizes(root: RunPath) -> dict[str, int]:
    """{path relative to ``root`` (posix): size} of every file under ``root``: one listing on an
    object store (``epath``'s ``rglob`` does not work there)."""
    if not is_remote(root):
        return {p.relative_to(root).as_posix(): p.stat().st_size
                for p in sorted(root.rglob("*")) if p.is_file()}
    fs, key = filesystem(root)
    key = key.rstrip("/")
    found = fs.find(key, detail=True)
    return {name[len(key) + 1:]: int(info["size"]) for name, info in sorted(found.items())
            if info.get("type", "file") == "file" and name.startswith(key + "/")}


def file_size(path: RunPath) -> int:
    return path.stat().length if is_remote(path) else path.stat().st_size


def open_to_read(path: RunPath, size: int | None = None) -> IO[bytes]:
    """``path`` opened for reading; on an object store, a known ``size`` spares the request that
    would look it up."""
    if not is_remote(path) or size is None:
        return path.open("rb")
    fs, key = filesystem(path)
    return fs.open(key, "rb", size=size)


def remove_tree(path: RunPath) -> None:
    """Deletes ``path`` and everything under it (nothing if it is missing)."""
    if is_remote(path):
        fs, key = filesystem(path)
        if fs.exists(key):
            fs.rm(key, recursive=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def move_tree(source: RunPath, target: RunPath, *, first: str = "") -> None:
    """Moves the tree ``source`` to ``target``. Locally one rename; on an object store every object
    is copied, then ``source/first`` (a commit marker: once it is gone the source is no longer
    complete, whatever happens next) is deleted before the rest."""
    if not is_remote(source):
        shutil.move(os.fspath(source), os.fspath(target))
        return
    fs, key = filesystem(source)
    _, target_key = filesystem(target)
    for rel in file_sizes(source):
        fs.copy(f"{key}/{rel}", f"{target_key}/{rel}")
    if first and fs.exists(f"{key}/{first}"):
        fs.rm(f"{key}/{first}")
    remove_tree(source)


def copy_file(source: RunPath, target: RunPath) -> None:
    """Copies one file between any two run paths (its bytes; nothing else)."""
    if not is_remote(source) and not is_remote(target):
        shutil.copy2(source, target)
    else:
        target.write_bytes(source.read_bytes())


def upload_tree(local: Path, target: RunPath) -> None:
    """Copies every file under the local directory ``local`` to ``target`` (same relative paths)."""
    for rel in file_sizes(local):
        copy_file(local / rel, target / rel)
