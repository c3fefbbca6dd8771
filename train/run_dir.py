"""The run directory, and the only code that knows its layout: ``config.yaml`` (the fully resolved
config, written atomically) and ``config_history/`` (each config the run started with), the
tokenizer files (``data/tokenizer.py`` names them), ``metrics.jsonl`` and the records cut from it on
resume (``metrics.superseded.N.jsonl``), ``tensorboard/`` (with ``train.profile``'s traces in
``tensorboard/plugins/profile/``), ``wandb/`` (Weights & Biases' own files) and ``wandb_run_id``,
``logs/``, ``expert_load.png``, ``run.lock``, and ``checkpoints/<step>/`` and
``damaged_checkpoints/`` (whose contents ``train/checkpoint.py`` writes). Training, fine-tuning,
evaluation and conversion all go through ``RunDir``.

The directory may be an object-store URL (``gs://``, ``s3://``: ``train/store.py``); every path
here is then an ``epath.Path`` and writes are single uploads.

One writer at a time: a trainer (or merge) holds an OS advisory lock (``flock``) on ``run.lock`` for
its whole life, taken before anything in the directory is touched; the kernel drops it when the
process ends, however it ends, so a killed trainer's lock file blocks nothing. On an object store the
lock is a lease (``train/lease.py``) that a killed trainer stops refreshing: it goes stale after
``run.lock_ttl`` seconds and is taken over. Under
``jax.distributed`` every process holds a ``RunDir`` of the same shared directory; process 0 takes the
lock and writes, and ``locked``, ``prepare`` and ``tokenizer_for`` keep the others in step with it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import yaml

from core.errors import ConfigError
from data.tokenizer import (
    TOKENIZER_FILE,
    TOKENIZER_FILES,
    Tokenizer,
    load_tokenizer,
    make_tokenizer,
    save_tokenizer,
)
from sharding.mesh import broadcast_from_0, sync_processes
from train.config import Config, config_from_dict, dump_yaml
from train.lease import ObjectLease
from train.store import RunPath, copy_file, is_remote, run_path, write_atomically
from train.validate import check_resume

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
DAMAGED_DIR = "damaged_checkpoints"  # checkpoints that failed verification, kept for inspection
HISTORY_DIR = "config_history"  # every config the run started with: NNN-stepS-TIME.yaml
STAMP = "%Y%m%dT%H%M%SZ"
LOCK_FILE = "run.lock"  # flock-ed by the one process that writes the run; names it (pid, host)
# Filesystems where flock is not supported (some FUSE mounts): the run goes on, unguarded, warned.
NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
COMMIT_FILE = "commit_success.txt"  # how Orbax marks a committed checkpoint on an object store


class RunDir:
    """One run directory (it may not exist yet)."""

    def __init__(self, path: str | os.PathLike):
        self.path: RunPath = run_path(path)
        self.remote = is_remote(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config_file = property(lambda self: self.path / CONFIG_FILE)
    metrics_file = property(lambda self: self.path / METRICS_FILE)
    checkpoints = property(lambda self: self.path / "checkpoints")
    damaged_checkpoints = property(lambda self: self.path / DAMAGED_DIR)
    tensorboard = property(lambda self: self.path / "tensorboard")
    logs = property(lambda self: self.path / "logs")
    expert_load_picture = property(lambda self: self.path / "expert_load.png")
    lock_file = property(lambda self: self.path / LOCK_FILE)
    config_history = property(lambda self: self.path / HISTORY_DIR)
    wandb = property(lambda self: self.path / "wandb")  # W&B writes it (wandb.init(dir=the run))
    wandb_run_id = property(lambda self: self.path / "wandb_run_id")  # one W&B run per directory

    def profile_log_dir(self, process: int, processes: int) -> RunPath:
        """Where process ``process`` of ``processes`` writes its ``jax.profiler`` trace: a
        TensorBoard log directory, under which JAX writes ``plugins/profile/<time>/<host>.xplane.pb``
        (where TensorBoard's profile plugin, xprof, looks). With several processes each has its
        own (``tensorboard/process<i>``): processes on one host would otherwise write the same
        file."""
        return self.tensorboard if processes == 1 else self.tensorboard / f"process{process}"

    def superseded_metrics(self, n: int) -> RunPath:
        """The ``n``th archive of metrics records cut on resume (1, 2, ...)."""
        return self.path / f"metrics.superseded.{n}.jsonl"

    @classmethod
    def of_checkpoint(cls, path: str | os.PathLike) -> tuple[RunDir, int | None]:
        """(run directory, step or None for the latest) from a run directory or one of its
        ``checkpoints/<step>`` directories; ValueError for anything else."""
        path = run_path(path)
        if (path / CONFIG_FILE).is_file():
            return cls(path), None
        if path.parent.name == "checkpoints" and (path.parent.parent / CONFIG_FILE).is_file():
            if not path.name.isdigit():
                raise ValueError(f"{path} is not a checkpoint step directory")
            if not path.is_dir():
                raise ValueError(f"{path} does not exist")
            return cls(path.parent.parent), int(path.name)
        raise ValueError(f"{path} is neither a meshlm run directory (with config.yaml) nor one of its "
                         "checkpoints/<step> directories")

    # ---------------------------------------------------------------------------------- the lock

    @contextlib.contextmanager
    def locked(self, lease_ttl_s: float = 60.0) -> Iterator[None]:
        """Holds the run's lock for the block (process 0 takes it; creates the directory). Another
        live holder is a ConfigError naming it (every process gets the same answer); the lock of a
        process that died was released by the kernel (a local directory) or goes stale after
        ``lease_ttl_s`` seconds (an object store's lease) and is taken."""
        release, problem = None, ""
        if jax.process_index() == 0:
            release, problem = self._take_lease(lease_ttl_s) if self.remote else self._take_lock()
        try:
            if broadcast_from_0(1 if problem else 0):
                raise ConfigError("run.dir", problem or "process 0 could not lock the run directory")
            yield
        finally:
            if release is not None:
                release()

    def _take_lease(self, ttl_s: float) -> tuple[Callable[[], None] | None, str]:
        """(release, or None; the problem when refused) of the object-store lease."""
        lease = ObjectLease(self.lock_file, ttl_s, {"pid": os.getpid(), "host": socket.gethostname()})
        try:
            problem = lease.acquire()
        except OSError as e:
            return None, f"cannot write to {self.path}: {e.strerror or e}"
        return (None, problem) if problem else (lease.release, "")

    def _take_lock(self) -> tuple[Callable[[], None] | None, str]:
        """(release of the lock, or None; the problem when refused)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            return None, f"cannot write to {self.path}: {e.strerror or e}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            return None, (f"{self.path} is in use by another trainer ({holder}); wait for it to end "
                          "or choose another run.dir")
        except OSError as e:
            if e.errno not in NO_LOCKING:
                os.close(fd)
                return None, f"cannot lock {self.lock_file}: {e.strerror or e}"
            print(f"warning: {self.lock_file} cannot be locked on this filesystem "
                  f"({e.strerror}): a second trainer on this run.dir would not be refused",
                  file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        os.fsync(fd)
        return (lambda: os.close(fd)), ""  # closing releases the lock

    # -------------------------------------------------------------------------------- the config

    def read_config(self) -> Config:
        """The run's saved config; ValueError if the directory or its config is missing or invalid."""
        if not self.path.is_dir():
            raise ValueError(f"{self.path} does not exist")
        if not self.config_file.is_file():
            raise ValueError(f"{self.path} is not a meshlm run directory (it has no {CONFIG_FILE})")
        try:
            raw = yaml.safe_load(self.config_file.read_text())
            if not isinstance(raw, dict):
                raise TypeError("it holds no mapping of sections")
            return config_from_dict(raw)
        except (yaml.YAMLError, ConfigError, TypeError, AttributeError) as e:
            raise ValueError(f"{self.config_file} is not a valid meshlm config ({e})") from None

    def write_config(self, cfg: Config) -> None:
        """Writes ``config.yaml`` atomically (the directory must exist)."""
        write_atomically(self.config_file, dump_yaml(cfg).encode())

    def prepare(self, cfg: Config) -> None:
        """Creates the directory and writes the config; on an existing run, first checks that
        ``cfg`` changes only what a resume may change (``check_resume``; keys added to the config
        since the run started take their defaults). Each config the run starts with that differs
        from the last is kept in ``config_history/``. ConfigError for a refused change or a
        directory that cannot be written; every process gets the same answer."""
        previous = self.started_config()
        if previous is not None:
            check_resume(previous, cfg, str(self.path))
        sync_processes("meshlm: run directory checked")  # every process read it before it changes
        problem = ""
        if jax.process_index() == 0:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                if cfg != previous:
                    self.record_config(cfg, previous)
                self.write_config(cfg)
            except OSError as e:
                problem = f"cannot write to {self.path}: {e.strerror or e}"
        if broadcast_from_0(1 if problem else 0):  # the others must not wait for process 0 forever
            raise ConfigError("run.dir", problem or "process 0 cannot write to the run directory")

    def started_config(self) -> Config | None:
        """The config of the run already here, or None; ConfigError if it cannot be read."""
        if not self.config_file.is_file():
            return None
        try:
            return self.read_config()
        except ValueError as e:
            raise ConfigError("run.dir", str(e)) from None

    def record_config(self, cfg: Config, previous: Config | None) -> None:
        """Adds ``cfg`` to ``config_history/`` as ``NNN-stepS-TIME.yaml`` (S: the newest committed
        checkpoint, where a resume starts). A run from before the history existed gets its
        ``previous`` config as the first entry."""
        self.config_history.mkdir(exist_ok=True)
        entries = sorted(self.config_history.glob("*.yaml"))
        if not entries and previous is not None:
            # (an object store keeps no modification time that epath reports: now, then)
            stamp = time.gmtime(time.time() if self.remote else self.config_file.stat().st_mtime)
            write_atomically(self.config_history / f"000-step0-{time.strftime(STAMP, stamp)}.yaml",
                             dump_yaml(previous).encode())
            entries = [None]
        step = max(self.committed_steps(), default=0) if self.checkpoints.is_dir() else 0
        name = f"{len(entries):03d}-step{step}-{time.strftime(STAMP, time.gmtime())}.yaml"
        write_atomically(self.config_history / name, dump_yaml(cfg).encode())

    # ----------------------------------------------------------------------------- the tokenizer

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer saved in the run; ValueError if it is missing or invalid. From an object
        store its files are read into a local scratch directory first (the tokenizer libraries
        read local files)."""
        if not self.remote:
            return load_tokenizer(self.path)
        if not (self.path / TOKENIZER_FILE).is_file():
            raise ValueError(f"{self.path / TOKENIZER_FILE} is missing: not a meshlm run directory")
        with tempfile.TemporaryDirectory(prefix="meshlm-tokenizer-") as scratch:
            for name in TOKENIZER_FILES:
                if (self.path / name).is_file():
                    copy_file(self.path / name, Path(scratch) / name)
            return load_tokenizer(scratch)

    def save_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Writes the tokenizer's files through a scratch directory (process 0), its metadata file
        last: a crash never leaves half a tokenizer."""
        if jax.process_index() != 0:
            return
        if self.remote:  # each file one upload, from a local scratch directory
            with tempfile.TemporaryDirectory(prefix="meshlm-tokenizer-") as scratch:
                save_tokenizer(tokenizer, scratch)
                for name in sorted(os.listdir(scratch), key=lambda n: n == TOKENIZER_FILE):
                    copy_file(Path(scratch) / name, self.path / name)
            return
        scratch = self.path / ".tokenizer.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        save_tokenizer(tokenizer, scratch)
        for name in sorted(os.listdir(scratch), key=lambda n: n == TOKENIZER_FILE):
            os.replace(scratch / name, self.path / name)
        scratch.rmdir()

    def tokenizer_for(self, spec: str) -> Tokenizer:
        """The run's tokenizer: the one saved here when resuming, else a new one from ``spec``,
        saved here."""
        resuming = (self.path / TOKENIZER_FILE).is_file()
        sync_processes("meshlm: tokenizer looked up")  # before process 0 may write it
        if resuming:
            return self.load_tokenizer()
        tokenizer = make_tokenizer(spec)
        self.save_tokenizer(tokenizer)
        return tokenizer

    def tokenizer_spec(self) -> str:
        """A ``data.tokenizer`` spec that rebuilds exactly the tokenizer saved here."""
        return "byte" if self.load_tokenizer().kind == "byte" else f"run:{self.path}"

    def copy_tokenizer_to(self, other: RunDir) -> None:
        """Copies the tokenizer files, as they are, into ``other`` (which must exist)."""
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                copy_file(self.path / name, other.path / name)

    # ---------------------------------------------------------------------- metrics, checkpoints

    def trim_metrics(self, step: int) -> RunPath | None:
        """On a start from ``step``: ``metrics.jsonl`` keeps the records up to ``step`` (none at step
        0: they are of an earlier attempt), so it reads as one uninterrupted run; the others, torn
        lines included, move to a new ``metrics.superseded.N.jsonl`` (process 0; nothing is ever
        deleted). Returns that archive, or None when nothing was cut."""
        if jax.process_index() != 0 or not self.metrics_file.is_file():
            return None
        kept, cut = [], []
        for line in self.metrics_file.read_bytes().splitlines():
            if line.strip():
                (kept if step and _step_of(line) in range(step + 1) else cut).append(line + b"\n")
        if not cut:
            return None
        n = 1
        while self.superseded_metrics(n).exists():
            n += 1
        write_atomically(self.superseded_metrics(n), b"".join(cut))  # first: a crash loses nothing
        write_atomically(self.metrics_file, b"".join(kept))
        return self.superseded_metrics(n)

    def losses(self) -> dict[int, float]:
        """{step: loss} from ``metrics.jsonl`` (the last record of a step wins)."""
        out = {}
        for line in self.metrics_file.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                out[int(record["step"])] = record["loss"]
        return out

    def committed_steps(self) -> list[int]:
        """The committed checkpoint steps, oldest first (orbax's listing: the temporary directories
        of unfinished saves are never listed; on an object store, a step is committed once Orbax
        wrote its commit file)."""
        if not self.remote:
            return sorted(ocp.utils.checkpoint_steps(self.checkpoints))
        if not self.checkpoints.exists():
            return []
        return sorted(int(p.name) for p in self.checkpoints.iterdir()
                      if p.name.isdigit() and (p / COMMIT_FILE).exists())


def _step_of(line: bytes) -> int:
    """The step of a metrics record, or -1 for a torn or foreign line."""
    try:
        record = json.loads(line)
        return int(record.get("step", 0)) if isinstance(record, dict) else -1
    except (ValueError, TypeError):
        return -1


def _lock_holder(fd: int) -> str:
    """Who holds a run's lock, as its lock file says."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {int(holder['pid'])} on {holder['host']}"
    except (ValueError, TypeError, KeyError, OSError):
        return "its lock file names no holder yet"
