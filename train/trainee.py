"""What a run trains: how its state is laid out, created and checkpointed, and the pure step
functions over it (``train/program.py`` jits them). ``Trainee`` is pre-training: every parameter,
from a seeded initialisation; checkpoints hold the whole TrainState. ``train/finetune_trainee.py``
subclasses it for LoRA and full fine-tuning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from model.flops import train_flops_per_token
from sharding.rules import Rules, tree_shardings
from train.config import Config
from train.state import TrainState, abstract_state, init_state
from train.step import eval_step, train_step

StepFn = Callable[..., Any]  # (state, batch, frozen) -> (state, metrics)
EvalFn = Callable[..., Any]  # (params, batch, frozen) -> {"loss_sum", "weight_sum", other sums}


class Trainee:
    """Pre-training. ``graphdef`` and ``abstract`` describe the TrainState the loop steps, which is
    also what checkpoints hold (``checkpoint_abstract`` / ``to_checkpoint`` / ``from_checkpoint``
    may differ in subclasses); ``shardings`` lays it out on ``mesh``. ``frozen`` is model state
    merged in but never trained (none here; a fine-tune's base weights)."""

    frozen: nnx.State | None = None
    frozen_abstract: nnx.State | None = None
    frozen_shardings: nnx.State | None = None

    def __init__(self, cfg: Config, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules):
        self.cfg, self.tx, self.mesh, self.rules = cfg, tx, mesh, rules
        self.graphdef, self.abstract = abstract_state(cfg.model, tx, cfg.train.seed)
        self.eval_graphdef = self.graphdef
        self.shardings = tree_shardings(self.abstract, mesh, rules)

    def step_frozen(self) -> Any:
        """What the jitted steps take beside the state and the batch (``frozen``, here)."""
        return self.frozen

    def step_frozen_layout(self) -> tuple[Any, Any]:
        """(abstract tree, shardings) of ``step_frozen``."""
        return self.frozen_abstract, self.frozen_shardings

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

    def train_fn(self, schedule: optax.Schedule) -> StepFn:
        """The pure train step (state, batch, frozen) -> (state, metrics)."""
        return functools.partial(train_step, graphdef=self.graphdef, tx=self.tx, schedule=schedule,
                                 microbatches=self.cfg.train.microbatches,
                                 router_bias_rate=self.cfg.model.router_bias_rate)

    def eval_fn(self) -> EvalFn:
        """The pure eval step (params, batch, frozen) -> {"loss_sum", "weight_sum"} (a preference
        objective adds the sums of its pair metrics: ``Program.eval_metrics`` logs their means)."""
        return functools.partial(eval_step, graphdef=self.eval_graphdef)

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
