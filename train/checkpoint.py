"""Orbax checkpoints of a run: ``run_dir/checkpoints/<step>/`` holding the sharded TrainState, a
small JSON record and the input pipeline's position (one file per process); asynchronous saves,
keep-last-K, and restore onto any mesh (every target array carries its NamedSharding).

Crash consistency: orbax writes a step into ``<step>.orbax-checkpoint-tmp*`` and renames it when
every process has written its part, so a killed save leaves only a temporary directory, which is
ignored and removed at the next start. On an object store (no rename) orbax writes ``<step>/`` in
place and commits it by writing ``commit_success.txt`` last; a step without it is ignored and
removed the same way. Just before that rename (or commit file), process 0 writes
``meshlm_manifest.json`` into the directory (size and SHA-256 of every file, and of the run's
tokenizer files), so a committed checkpoint always carries its manifest; one without it is not
trusted. ``verify`` detects a truncated, altered or missing file (the manifest included).

Choosing a checkpoint has one owner, ``Checkpointer.newest_verified``: training (``resume_step``)
moves damaged newer checkpoints aside to ``run_dir/damaged_checkpoints/`` and resumes the newest
good one, and refuses to start again from step 0 when checkpoints exist but none verifies (unless
``checkpoint.restart_if_damaged``); reading a run (``readable_step``: eval, inspect, export) passes
over damaged ones with a warning and moves nothing, since the run may be live.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint._src.metadata import array_metadata_store  # orbax is pinned (setup.py)

from core.errors import first_line
from data.tokenizer import TOKENIZER_FILES
from sharding.mesh import broadcast_from_0, sync_processes
from train.config import CheckpointConfig
from train.orbax_s3 import atomicity_options
from train.run_dir import COMMIT_FILE, RunDir
from train.state import TrainState, with_shardings
from train.store import (
    RunPath,
    file_size,
    file_sizes,
    is_remote,
    move_tree,
    open_to_read,
    run_path,
    write_atomically,
)

MANIFEST = "meshlm_manifest.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Orbax rewrites its step metadata (commit time) after the rename, and writes an object store's
# commit file after the manifest: neither is covered by it.
UNHASHED = (MANIFEST, "_CHECKPOINT_METADATA", COMMIT_FILE)


class DamagedCheckpointError(ValueError):
    """A checkpoint whose files do not match its manifest (truncated, altered or missing)."""


class DamagedRunFileError(ValueError):
    """A run-level file (the tokenizer) differs from the one the checkpoints were written with."""


class NoUsableCheckpointError(ValueError):
    """A run has checkpoints, but none of them verifies: starting again would lose it silently."""


class CheckpointWriteError(RuntimeError):
    """A save that could not be completed (nothing was committed for its step)."""


class _IteratorSnapshot:
    """An iterator position captured when the save starts, in the form grain's orbax handler
    stores (bytes from ``get_state``): later batches drawn during an async save do not leak in.
    Restoring reads the files back directly (see ``data_states``)."""

    def __init__(self, state: dict[str, Any] | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()


def file_digest(path: RunPath, size: int | None = None) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (``size``: its size, when known from a listing,
    spares an object store a request)."""
    h = hashlib.sha256()
    with open_to_read(path, size) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _sizes(base: RunPath, names: Iterable[str], listed: bool) -> dict[str, int]:
    """{name: size} of the files ``names`` under ``base`` that exist: from one listing of ``base``
    (``listed``, a checkpoint on an object store), else file by file."""
    if listed:
        return file_sizes(base)
    return {rel: file_size(base / rel) for rel in names if (base / rel).is_file()}


def write_manifest(step_dir: RunPath, run_dir: RunPath) -> None:
    """Records size and digest of every file under ``step_dir`` and of the run's tokenizer files
    (written atomically)."""
    files = {rel: {"size": size, "sha256": file_digest(step_dir / rel, size)}
             for rel, size in file_sizes(step_dir).items() if rel.rsplit("/", 1)[-1] not in UNHASHED}
    run_files = {name: {"size": size, "sha256": file_digest(run_dir / name, size)}
                 for name, size in _sizes(run_dir, TOKENIZER_FILES, listed=False).items()}
    manifest = {"version": 1, "files": files, "run_files": run_files}
    write_atomically(step_dir / MANIFEST, json.dumps(manifest, indent=1).encode())


def _check_files(base: RunPath, expected: dict[str, Any], listed: bool = False) -> str:
    """The first problem of the files under ``base`` against their recorded size and digest."""
    sizes = _sizes(base, expected, listed)
    for rel, want in expected.items():
        if rel not in sizes:
            return f"{rel} is missing"
        if sizes[rel] != want["size"]:
            return f"{rel} has {sizes[rel]} bytes, {want['size']} were written (truncated or altered)"
        if file_digest(base / rel, sizes[rel]) != want["sha256"]:
            return f"{rel} does not match its recorded SHA-256 (altered)"
    return ""


def verify(step_dir: RunPath, run_dir: RunPath) -> bool:
    """True if ``step_dir`` matches its manifest; raises DamagedCheckpointError naming the first bad
    file (a checkpoint without a manifest is damaged: every committed save carries one) or
    DamagedRunFileError for a changed tokenizer file."""
    step = step_dir.name
    path = step_dir / MANIFEST
    if not path.is_file():
        raise DamagedCheckpointError(f"checkpoint {step} is damaged: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
        files, run_files = dict(manifest["files"]), dict(manifest["run_files"])
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpointError(f"checkpoint {step} is damaged: its {MANIFEST} is unreadable "
                                f"({type(e).__name__})") from None
    if problem := _check_files(step_dir, files, listed=is_remote(step_dir)):
        raise DamagedCheckpointError(f"checkpoint {step} is damaged: {problem}")
    if problem := _check_files(run_dir, run_files):
        raise DamagedRunFileError(f"{run_dir}: {problem} since checkpoint {step} was written")
    return True


def free_bytes(path: RunPath) -> int:
    """Free space on the filesystem holding ``path`` (tests replace this to simulate a full disk);
    an object store has no such figure (unbounded here)."""
    return sys.maxsize if is_remote(path) else shutil.disk_usage(path).free


def warn(message: str) -> None:
    """One ``warning:`` line on stderr, from process 0 only."""
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _absl_errors_only(quiet: bool = True) -> Iterator[None]:
    """absl's logger (orbax logs through it) at ERROR or above inside the block, when ``quiet``."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    if quiet:
        absl_logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _save_shards_whole_in_one_process() -> None:
    """Orbax's replica-parallel save (its default on CPU and TPU) splits every replicated shard
    among its replicas so that processes share the writing. In one process all the slices are
    written by that process anyway, and each costs a compiled slice program per array shape and
    device (a replicated state on 8 devices: dozens of programs, ~2 s at its first save). One
    process writes each shard whole, as orbax does on GPUs; with several the default stays. The
    saved values are the same and any checkpoint restores either way."""
    _register_array_handler(None if jax.process_count() > 1 else False)  # None: orbax's default


@functools.cache  # once per process and setting
def _register_array_handler(use_replica_parallel: bool | None) -> None:
    with _absl_errors_only():  # orbax warns of every override: expected here
        # the same metadata store as orbax's own registration (the handler's default is none)
        ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
            use_replica_parallel=use_replica_parallel,
            array_metadata_store=array_metadata_store.Store()), override=True)


class Checkpointer:
    """A thin, typed wrapper over ``ocp.CheckpointManager`` for one run directory.

    Saves always run through orbax's asynchronous checkpointer (so the manifest is written inside
    the temporary directory before its commit); ``async_save=False`` waits for each save."""

    def __init__(self, run_dir: str | os.PathLike, cfg: CheckpointConfig, read_only: bool = False, *,
                 save_buffer_gb: float | None = None):
        """``save_buffer_gb``: at most this many GB of the state in flight to disk at once (Orbax's
        ``save_concurrent_gb``; an array larger than it goes alone), where the host must not hold
        the state twice (a checkpoint import on a CPU host, whose device arrays are host memory);
        None keeps Orbax's default (96 GB) for training's saves."""
        self.run_dir = run_path(run_dir)
        self.run_dir = self.run_dir if is_remote(self.run_dir) else self.run_dir.resolve()
        self.directory = RunDir(self.run_dir).checkpoints
        self.damaged = RunDir(self.run_dir).damaged_checkpoints
        self.wait_each_save = not cfg.async_save
        self.restart_if_damaged = cfg.restart_if_damaged
        self._pending: int | None = None
        self._verified: set[int] = set()  # steps that matched their manifest (read once)
        if not read_only:
            _save_shards_whole_in_one_process()
        async_options = None if read_only else ocp.AsyncOptions(
            post_finalization_callback=self._before_commit)
        # orbax announces each option a read-only manager ignores: not news
        with _absl_errors_only(quiet=read_only):
            options = ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep, enable_async_checkpointing=True, create=not read_only,
                read_only=read_only, cleanup_tmp_directories=not read_only, async_options=async_options,
                atomicity_options=atomicity_options(self.directory))
            if save_buffer_gb is None:
                self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                     item_names=("state", "meta", "data"))
            else:
                handlers = {"state": ocp.StandardCheckpointHandler(save_concurrent_gb=save_buffer_gb),
                            "meta": ocp.JsonCheckpointHandler(),
                            "data": grain.checkpoint.CheckpointHandler()}
                self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                     item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Committed steps (temporary directories of unfinished saves are never listed)."""
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any],
             data_state: dict[str, Any], need_bytes: int = 0) -> None:
        """Starts an (asynchronous) save; the state may be donated as soon as this returns.
        An earlier save that failed raises here (orbax waits for it first). With ``need_bytes``,
        too little free space on the checkpoint filesystem raises OSError before anything is
        written (process 0 decides for all)."""
        # A device collective first: it fails at once when a peer has died (its connections close),
        # where orbax's commit barriers below go through the coordination service and would wait
        # for the heartbeat timeout, after which JAX aborts the process.
        sync_processes(f"meshlm: saving checkpoint {step}")
        self.wait()
        if need_bytes:
            free = free_bytes(self.directory) if jax.process_index() == 0 else 0
            if broadcast_from_0(int(free < need_bytes)):
                raise OSError(f"not enough disk space for checkpoint {step} in {self.directory}: "
                              f"{free / 2**20:.1f} MiB free, {need_bytes / 2**20:.1f} MiB needed")
        self._pending = step
        self._verified.discard(step)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
            data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state))), force=True)
        if self.wait_each_save:
            self.wait()

    def _before_commit(self) -> None:
        """Orbax's post-finalization hook (process 0, background thread): every process has
        written its part into the temporary directory, which is renamed right after this."""
        step = self._pending
        if is_remote(self.directory):  # written in place; the commit file comes after this
            write_manifest(self.directory / str(step), self.run_dir)
            return
        candidates = sorted(self.directory.glob(f"{step}{TMP_SUFFIX}*"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"checkpoint {step}: no temporary directory to finish")
        write_manifest(candidates[-1], self.run_dir)

    def verify(self, step: int) -> None:
        """See ``verify``: returns, or raises for a damaged step; a step that verified is not read
        again."""
        if step not in self._verified:
            verify(self.directory / str(step), self.run_dir)
            self._verified.add(step)

    def newest_verified(self) -> tuple[int | None, dict[int, str]]:
        """(the newest committed step that verifies or None, {newer step: its problem}): the one
        selection training and reading share. Process 0 verifies (only its problems carry text);
        every process gets the same steps. A changed tokenizer raises DamagedRunFileError."""
        steps = sorted(self.all_steps(), reverse=True)
        good, problems, run_problem = -1, {}, ""
        if jax.process_index() == 0:
            for step in steps:
                try:
                    self.verify(step)
                except DamagedCheckpointError as e:
                    problems[step] = str(e)
                    continue
                except DamagedRunFileError as e:
                    run_problem = str(e)
                good = step
                break
        if broadcast_from_0(1 if run_problem else 0):
            raise DamagedRunFileError(run_problem or "the run's tokenizer files do not match its "
                                      "checkpoints (see process 0)")
        good = broadcast_from_0(good)
        return (good if good >= 0 else None), {s: problems.get(s, "") for s in steps if s > good}

    def resume_step(self) -> int | None:
        """Where training starts: the newest checkpoint that verifies, or None when there are none.
        Damaged newer ones are moved to ``run_dir/damaged_checkpoints/`` with a warning each
        (process 0 moves). When checkpoints exist and none verifies: NoUsableCheckpointError and
        nothing moved, or with ``checkpoint.restart_if_damaged`` all moved and None."""
        good, damaged = self.newest_verified()
        if good is None and damaged and not self.restart_if_damaged:
            newest = max(damaged)
            raise NoUsableCheckpointError(
                f"none of the {len(damaged)} checkpoints of {self.run_dir} verifies "
                f"({damaged[newest] or f'checkpoint {newest} is damaged, see process 0'}); nothing "
                "was moved or cut: choose another run.dir, or set checkpoint.restart_if_damaged=true to "
                f"train this one again from step 0 (the checkpoints move to {self.damaged.name}/, "
                "metrics.jsonl to an archive)")
        for step in sorted(damaged, reverse=True):
            warn(f"{damaged[step]}; it is moved to {self.damaged} and "
                 + (f"training resumes from checkpoint {good}" if good is not None else
                    "training starts again from step 0 (checkpoint.restart_if_damaged=true)"))
            if jax.process_index() == 0:
                self.quarantine(step)
        if damaged:
            sync_processes("meshlm: damaged checkpoints moved")
            self.manager.reload()
        return good

    def readable_step(self) -> int:
        """The checkpoint to read a run from (eval, inspect, export): the newest that verifies, with
        one warning when newer ones are damaged (they stay where they are: the run may be live).
        DamagedCheckpointError when none verifies, ValueError when there are none."""
        good, damaged = self.newest_verified()
        if good is None:
            if not damaged:
                raise ValueError(f"{self.run_dir} has no complete checkpoint")
            others = f"; so are the {len(damaged) - 1} older ones" if len(damaged) > 1 else ""
            raise DamagedCheckpointError(f"no checkpoint of {self.run_dir} verifies "
                                         f"({damaged[max(damaged)]}{others})")
        if damaged:
            newest = max(damaged)
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            warn(f"{damaged[newest]}{more}; using checkpoint {good}, the newest that verifies")
        return good

    def quarantine(self, step: int) -> RunPath:
        """Moves checkpoint ``step`` out of the checkpoint directory (kept for inspection; on an
        object store its commit file goes first, so a crash midway leaves no committed step)."""
        target_dir = self.damaged
        target_dir.mkdir(exist_ok=True)
        target, n = target_dir / str(step), 1
        while target.exists():
            target, n = target_dir / f"{step}.{n}", n + 1
        move_tree(self.directory / str(step), target, first=COMMIT_FILE)
        return target

    def restore(self, step: int, abstract: TrainState, shardings: TrainState
                ) -> tuple[TrainState, dict[str, Any], list[dict[str, Any]]]:
        """(state laid out by ``shardings`` on any mesh, JSON record, the input-pipeline
        positions that every process saved, in process order) at ``step``."""
        target = with_shardings(abstract, shardings)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"], self.data_states(step)

    def data_states(self, step: int) -> list[dict[str, Any]]:
        """Every process's saved input position at ``step`` (grain writes process_I-of-N.json)."""
        data_dir = self.directory / str(step) / "data"
        files = sorted(data_dir.glob("process_*-of-*.json"))
        if not files:
            raise ValueError(f"checkpoint {step} holds no input-pipeline position ({data_dir})")
        count = int(files[0].stem.rsplit("-of-", 1)[1])
        by_index = {int(f.stem.split("_")[1].split("-")[0]): f for f in files}
        if sorted(by_index) != list(range(count)):
            raise ValueError(f"checkpoint {step} lacks input positions of some of its {count} "
                             "processes")
        try:
            return [json.loads(by_index[i].read_text()) for i in range(count)]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"checkpoint {step} has a damaged input position ({e})") from None

    def restore_params(self, step: int, abstract_params: nnx.State,
                       shardings: nnx.State) -> nnx.State:
        """Only the parameters at ``step`` (no optimizer state is read), laid out by ``shardings``;
        the checkpoint is verified against its manifest first (DamagedCheckpointError if it fails).
        ValueError if it lacks some of them (another model's, or a LoRA fine-tune's adapters)."""
        self.verify(step)
        target = {"params": with_shardings(abstract_params, shardings)}
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
        params = out["state"]["params"]
        missing = ["/".join(str(k.key) for k in path if hasattr(k, "key")) for path, leaf in
                   jax.tree_util.tree_flatten_with_path(params)[0] if not isinstance(leaf, jax.Array)]
        if missing:  # a partial restore leaves what the checkpoint lacks as ShapeDtypeStructs
            raise ValueError(f"checkpoint {step} lacks {len(missing)} of the model's parameters "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): it "
                             "holds another model, or LoRA adapters (merge them first: python -m "
                             "train.finetune merge ADAPTER_RUN OUT_RUN)")
        return params

    def restore_meta(self, step: int) -> dict[str, Any]:
        """Only the JSON record of checkpoint ``step``."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        """Blocks until the pending save is committed; CheckpointWriteError if it failed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # orbax and tensorstore raise many types for I/O failures
            raise CheckpointWriteError(f"checkpoint {self._pending} could not be written: "
                                       f"{first_line(e)}") from e

    def close(self) -> None:
        self.manager.close()
