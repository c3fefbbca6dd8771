"""Orbax checkpoints of a run: ``run_dir/checkpoints/<step>/`` holding the sharded TrainState and a
small JSON record; asynchronous saves, keep-last-K, and restore onto any mesh (every target array
carries its NamedSharding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx

from train.config import CheckpointConfig
from train.state import TrainState, with_shardings


class Checkpointer:
    """A thin, typed wrapper over ``ocp.CheckpointManager`` for one run directory."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, create: bool = True):
        self.directory = Path(run_dir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Starts an (asynchronous) save; the state may be donated as soon as this returns."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract: TrainState,
                shardings: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """The state at ``step``, laid out by ``shardings`` (any mesh), and its JSON record."""
        target = with_shardings(abstract, shardings)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

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
