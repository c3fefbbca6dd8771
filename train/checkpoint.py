"""Orbax checkpoints of a run: ``run_dir/checkpoints/<step>/`` holding the sharded TrainState, a
small JSON record and the input pipeline's position (one file per process); asynchronous saves,
keep-last-K, and restore onto any mesh (every target array carries its NamedSharding).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp
from flax import nnx

from train.config import CheckpointConfig
from train.state import TrainState, with_shardings


class _IteratorSnapshot:
    """An iterator position captured when the save starts, in the form grain's orbax handler
    stores (bytes from ``get_state``): later batches drawn during an async save do not leak in.
    Restoring reads the files back directly (see ``data_states``)."""

    def __init__(self, state: dict[str, Any] | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()



class Checkpointer:
    """A thin, typed wrapper over ``ocp.CheckpointManager`` for one run directory."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, read_only: bool = False):
        self.directory = Path(run_dir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=not read_only,
            read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any],
             data_state: dict[str, Any]) -> None:
        """Starts an (asynchronous) save; the state may be donated as soon as this returns."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
            data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state))), force=True)

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
        except json.JSONDecodeError as e:
            raise ValueError(f"checkpoint {step} has a damaged input position ({e})") from None

    def restore_params(self, step: int, abstract_params: nnx.State,
                       shardings: nnx.State) -> nnx.State:
        """Only the parameters at ``step`` (no optimizer state is read), laid out by ``shardings``."""
        target = {"params": with_shardings(abstract_params, shardings)}
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
        return out["state"]["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
