"""What the training loop trains: how its state is created, stepped, evaluated, checkpointed and
sampled from. ``Trainee`` is pre-training (every parameter, from a seeded initialisation; checkpoints
hold the whole TrainState); ``train/finetune_state.py`` subclasses it for LoRA and full fine-tuning.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from model.flops import train_flops_per_token
from sharding.rules import Rules
from train.config import Config
from train.state import TrainState, abstract_state, init_state, state_shardings
from train.step import jit_eval_step, jit_train_step

StepFn = Any  # (state, batch) -> (state, metrics), the state donated
EvalFn = Any  # (params, batch) -> {"loss_sum", "weight_sum"}


class Trainee:
    """Pre-training. ``graphdef`` and ``abstract`` describe the TrainState the loop steps, which is
    also what checkpoints hold (``checkpoint_abstract`` / ``to_checkpoint`` / ``from_checkpoint``
    may differ in subclasses); ``shardings`` lays it out on ``mesh``."""

    def __init__(self, cfg: Config, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules):
        self.cfg, self.tx, self.mesh, self.rules = cfg, tx, mesh, rules
        self.graphdef, self.abstract = abstract_state(cfg.model, tx, cfg.train.seed)
        self.shardings = state_shardings(self.abstract, mesh, rules)

    def init(self) -> TrainState:
        """The state of step 0."""
        return init_state(self.cfg.model, self.tx, self.cfg.train.seed, self.shardings)

    # ------------------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_abstract(self) -> tuple[Any, Any]:
        """(abstract tree, shardings) of what a checkpoint holds."""
        return self.abstract, self.shardings

    def to_checkpoint(self, state: TrainState) -> Any:
        return state

    def from_checkpoint(self, saved: Any, meta: dict[str, Any]) -> TrainState:
        """The state from a restored checkpoint and its JSON record (ValueError if they do not
        belong to this run)."""
        return saved

    def checkpoint_meta(self) -> dict[str, Any]:
        """Fields added to every checkpoint's JSON record."""
        return {}

    # ------------------------------------------------------------------------- steps and models

    def jit_steps(self, schedule: optax.Schedule, batch_sh: NamedSharding) -> tuple[StepFn, EvalFn]:
        """(train step, eval step), each jitted once with explicit shardings."""
        return (jit_train_step(self.graphdef, self.tx, schedule, self.cfg.train.microbatches,
                               self.shardings, batch_sh),
                jit_eval_step(self.graphdef, self.shardings.params, batch_sh))

    def plain_model(self, state: TrainState) -> tuple[nnx.GraphDef, nnx.State]:
        """(graphdef, params) of a plain model (no adapters) equal to the trained one: for sampling."""
        return self.graphdef, state.params

    def trainable_counts(self) -> tuple[int, int] | None:
        """(trainable, total) parameter counts when not every parameter is trained, else None."""
        return None

    def flops_per_token(self) -> float:
        """Model FLOPs of one trained token (for MFU): 6N plus attention."""
        return train_flops_per_token(self.cfg.model, self.cfg.train.seq_len)


def count(tree: Any) -> int:
    """Number of array entries in ``tree``."""
    return sum(x.size for x in jax.tree.leaves(tree))
