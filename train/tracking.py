"""Where a run's metrics records go, behind one interface (``Logger``: write a record, close):
``metrics.jsonl`` (``JsonlLogger``), TensorBoard (``TensorBoardLogger``) and Weights & Biases
(``WandbLogger``). ``train/metrics.py: MetricsWriter`` picks them from the config and hands each
record to all of them; only process 0 opens any. ``flush`` makes what was written durable (before a
checkpoint: the records up to a committed step are never lost). On an object store, which has no
append, ``metrics.jsonl`` and the event files are rewritten whole when they are flushed.

A record is ``{"step": int, name: number | per-layer list | [layer][expert] list, ...}``: the MoE
metrics come per layer (1-D) or per layer and expert (2-D)."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from typing import Any, Protocol

import numpy as np

from core.errors import ConfigError, first_line
from train.run_dir import RunDir
from train.store import RunPath, is_remote, run_path, scheme_of, write_atomically

# On an object store metrics.jsonl is rewritten whole: at most this often (and at every flush).
REWRITE_EVERY_S = 10.0


class Logger(Protocol):
    """One place metrics go."""

    def write(self, record: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers by name, ``step`` left out: a per-layer list becomes ``name/layerI``
    (2-D lists are left to the loggers that draw histograms)."""
    out = {}
    for name, value in record.items():
        if name != "step" and isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, list) and np.ndim(value) == 1:  # per MoE layer
            out |= {f"{name}/layer{i}": float(x) for i, x in enumerate(value)}
    return out


class JsonlLogger:
    """Appends each record as one JSON line to ``metrics.jsonl``. On an object store the lines wait
    in memory and the file is read, extended and rewritten (one upload) at most every
    ``REWRITE_EVERY_S`` seconds and at each ``flush``: read back each time, since the run
    directory's resume trims it after this logger opened."""

    def __init__(self, path: RunPath):
        self.path, self.remote = path, is_remote(path)
        self.pending: list[str] = []
        self.rewritten_at = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if not self.remote:
            with self.path.open("a") as f:
                f.write(line)
            return
        self.pending.append(line)
        if time.monotonic() - self.rewritten_at >= REWRITE_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.remote and self.pending:
            old = self.path.read_bytes() if self.path.is_file() else b""
            write_atomically(self.path, old + "".join(self.pending).encode())
            self.pending = []
        self.rewritten_at = time.monotonic()

    def close(self) -> None:
        self.flush()


class TensorBoardLogger:
    """TensorBoard events in ``tensorboard/``: scalars, per-layer scalars, and a histogram per layer
    of each 2-D (layer x expert) metric."""

    def __init__(self, directory: RunPath):
        # tensorboardX imports torch when it is installed (over a second): only when asked for
        from tensorboardX import SummaryWriter
        from tensorboardX.record_writer import register_writer_factory

        if is_remote(directory):  # its own s3/gs writers need boto3 / google-cloud-storage
            register_writer_factory(scheme_of(directory), _StoreWriterFactory())
        self.tb = SummaryWriter(os.fspath(directory))

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for name, value in scalars(record).items():
            self.tb.add_scalar(name, value, step)
        for name, value in record.items():
            if isinstance(value, list) and np.ndim(value) == 2:  # per MoE layer and expert
                for i, row in enumerate(value):
                    self.tb.add_histogram(f"{name}/layer{i}", np.asarray(row), step)

    def flush(self) -> None:
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


class _StoreRecordWriter:
    """An event file on an object store, through epath: its bytes kept in memory and uploaded whole
    at each flush (as tensorboardX's own S3 and GCS writers do; event files of scalars are small)."""

    def __init__(self, path: str):
        self.path, self.data = run_path(path), bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def flush(self) -> None:
        write_atomically(self.path, bytes(self.data))

    def close(self) -> None:
        self.flush()


class _StoreWriterFactory:
    """tensorboardX's writer factory (``record_writer.register_writer_factory``) for a URL scheme."""

    def open(self, path: str) -> _StoreRecordWriter:
        return _StoreRecordWriter(path)

    def directory_check(self, path: str) -> None:
        pass  # an object store has no directories to make


class WandbLogger:
    """A Weights & Biases run in project ``project``, with the run's config. One W&B run per run
    directory: its id is kept in ``wandb_run_id``, so a resume continues the same W&B run. Records
    are plotted against their ``step`` (W&B's own step only grows: a resume that repeats steps
    would otherwise be dropped). ``WANDB_MODE=offline`` keeps everything in ``wandb/``."""

    def __init__(self, project: str, run: RunDir, config: dict[str, Any]):
        try:  # wandb is optional (the `wandb` extra) and slow to import: only when run.wandb is set
            import wandb
        except ImportError:
            raise ConfigError("run.wandb", "needs the wandb package: pip install -e '.[wandb]'") from None
        if not run.wandb_run_id.is_file():
            run.wandb_run_id.write_text(secrets.token_hex(4) + "\n")  # W&B's id alphabet
        # W&B keeps its files in a local directory: the run's own, or for an object store a local one
        local = run.path if not run.remote else tempfile.mkdtemp(prefix="meshlm-wandb-")
        try:
            self.run = wandb.init(project=project, dir=str(local), config=config,
                                  id=run.wandb_run_id.read_text().strip(), resume="allow",
                                  name=run.path.name)
        except Exception as e:  # wandb raises many types (no login, no network, a bad entity)
            raise ConfigError("run.wandb", f"Weights & Biases did not start: {first_line(e)} (log "
                              "in with `wandb login`, or set WANDB_MODE=offline)") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, record: dict[str, Any]) -> None:
        self.run.log({"step": int(record["step"]), **scalars(record)})

    def flush(self) -> None:
        pass  # W&B's own process syncs

    def close(self) -> None:
        self.run.finish()
