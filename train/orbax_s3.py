"""Orbax writing checkpoints to ``s3://`` directly: with train/checkpoint.py's import of Orbax's
array metadata store, the one place meshlm reaches into Orbax's private names.

Orbax 0.12.8 builds the TensorStore key-value spec of every array (written, read, and the OCDBT
merge of the processes' parts) in ``tensorstore_utils.build_kvstore_tspec``, which knows two kinds of
directory: ``gs://`` (TensorStore's ``gcs`` driver) and absolute local paths (``file``). An
``s3://`` directory is first mangled by ``os.path.normpath`` (``s3:/bucket``) and then refused as a
relative path. TensorStore itself has an ``s3`` driver; Orbax offers no public hook to choose it (the
type handlers' options carry no spec, and the OCDBT merge builds its spec outside any handler), so
three private names are replaced, each delegating to Orbax's own code for everything but ``s3://``:

- ``tensorstore_utils._normalize_path``: keeps ``s3://`` (Orbax restores only ``gs://``);
- ``tensorstore_utils._use_gcs_driver``: true for ``s3://`` too, so Orbax takes its remote-store
  branch (no absolute-path check; a bucket-relative key);
- ``gcs_utils.get_kvstore_for_gcs``: for ``s3://``, TensorStore's ``s3`` spec with the endpoint AWS's
  clients use (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; TensorStore does not read them) and
  credentials from the usual AWS variables when they are set (else TensorStore's default chain).

Orbax's commit is chosen with its public options: ``AtomicityMode.COMMIT_FILE`` (a
``commit_success.txt`` written last) on every object store, as Orbax does by itself for ``gs://``.
``tests/test_remote_run.py`` fails loudly if an Orbax upgrade renames or changes these functions.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import gcs_utils
from orbax.checkpoint._src.serialization import tensorstore_utils

from train.store import is_remote, s3_endpoint

PATCHED = ((tensorstore_utils, "_normalize_path"), (tensorstore_utils, "_use_gcs_driver"),
           (gcs_utils, "get_kvstore_for_gcs"))
_ORIGINAL = {name: getattr(module, name) for module, name in PATCHED}


def _normalize_path(path: str) -> str:
    if path.startswith("s3://"):
        return "s3://" + os.path.normpath("/" + path.removeprefix("s3://")).lstrip("/")
    return _ORIGINAL["_normalize_path"](path)


def _use_gcs_driver(directory: str) -> bool:
    return directory.startswith("s3://") or _ORIGINAL["_use_gcs_driver"](directory)


def s3_kvstore_spec(path: str) -> dict[str, Any]:
    """TensorStore's ``s3`` key-value spec of ``s3://bucket/key`` (with the endpoint, if any)."""
    url = urlparse(path)
    spec: dict[str, Any] = {"driver": "s3", "bucket": url.netloc, "path": url.path.lstrip("/")}
    if endpoint := s3_endpoint():
        spec["endpoint"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID"):  # else TensorStore's default chain (profile, IMDS...),
        spec["aws_credentials"] = {"type": "environment"}  # whose misses it logs as errors
    return spec


def _get_kvstore(path: str) -> dict[str, Any]:
    if path.startswith("s3://"):
        return s3_kvstore_spec(path)
    return _ORIGINAL["get_kvstore_for_gcs"](path)


_REPLACEMENTS = {"_normalize_path": _normalize_path, "_use_gcs_driver": _use_gcs_driver,
                 "get_kvstore_for_gcs": _get_kvstore}


def enable_s3() -> None:
    """Installs the three replacements (idempotent)."""
    for module, name in PATCHED:
        setattr(module, name, _REPLACEMENTS[name])


def atomicity_options(directory: Any) -> ocp.options.AtomicityOptions | None:
    """Orbax's commit for ``directory``: a commit file on an object store (no atomic rename there),
    Orbax's default (a rename of the temporary directory) on a filesystem."""
    if not is_remote(directory):
        return None
    enable_s3()
    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)
