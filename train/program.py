"""The sharded training program of a config, built in one place: the mesh and the logical rules, what
is trained (``Trainee``: abstract and initialised state, its shardings), the batch sharding, the
train and eval steps jitted once with explicit in/out shardings and the state donated, and the
memory report of a compiled step. The training loop, fine-tuning, the AOT compile, the scaling
check and the training benchmarks use it (perplexity runs the inference graph: ``inference/score.py``).

The steps are traced inside ``activation_sharding(mesh, rules)`` wherever they are first called,
so model code's ``constrain`` calls resolve on this program's mesh.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.batches import Batch, to_global
from data.pipeline import empty_batch
from sharding.constrain import under_activation_sharding
from sharding.mesh import make_mesh
from sharding.rules import default_rules, logical_sharding
from train.config import Config
from train.finetune_trainee import FinetuneTrainee
from train.optimizer import make_optimizer
from train.state import TrainState, with_shardings
from train.step import all_finite
from train.trainee import Trainee


class Program:
    """The training program of ``cfg`` on ``mesh`` (default: ``cfg.mesh`` over ``devices``, or all
    devices). Pre-training, or a fine-tune of ``cfg.finetune.base``."""

    def __init__(self, cfg: Config, *, mesh: Mesh | None = None, devices: list | None = None):
        t = cfg.train
        self.cfg = cfg
        self.mesh = mesh if mesh is not None else make_mesh(cfg.mesh, devices)
        self.rules = default_rules()
        self.tx, self.schedule = make_optimizer(cfg.optim, t.steps)
        trainee_cls = FinetuneTrainee if cfg.finetune.base else Trainee
        self.trainee: Trainee = trainee_cls(cfg, self.tx, self.mesh, self.rules)
        self.batch_sharding = logical_sharding(("batch", "length"), (t.batch_size, t.seq_len),
                                               self.mesh, self.rules)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        tr = self.trainee
        frozen_shardings = tr.step_frozen_layout()[1]
        self._train_step = jax.jit(
            under_activation_sharding(tr.train_fn(self.schedule), self.mesh, self.rules),
            in_shardings=(tr.shardings, self.batch_sharding, frozen_shardings),
            out_shardings=(tr.shardings, replicated), donate_argnums=0)
        self._eval_step = jax.jit(
            under_activation_sharding(tr.eval_fn(), self.mesh, self.rules),
            in_shardings=(tr.shardings.params, self.batch_sharding, frozen_shardings),
            out_shardings=replicated)
        self._all_finite = jax.jit(all_finite, in_shardings=(tr.shardings,), out_shardings=replicated)

    # ------------------------------------------------------------------------------- running it

    def init(self) -> TrainState:
        """The state of step 0, created sharded."""
        return self.trainee.init()

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step (``state`` is donated)."""
        return self._train_step(state, batch, self.trainee.step_frozen())

    def eval_step(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """``loss_sum`` and ``weight_sum`` of one batch (tokens; a preference objective: pairs),
        and the sums over them of the objective's other metrics (``train/preference.py``)."""
        return self._eval_step(params, batch, self.trainee.step_frozen())

    def state_finite(self, state: TrainState) -> bool:
        """Whether every floating-point value of the state is finite (checked before a save)."""
        return bool(jax.device_get(self._all_finite(state)))

    def global_batch(self, local: dict[str, np.ndarray]) -> Batch:
        """This process's rows of a batch -> global arrays laid out by the batch sharding."""
        return to_global(local, self.batch_sharding, self.cfg.train.batch_size)

    def eval_metrics(self, params: Any, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        """The held-out metrics over this process's evaluation batches (every process runs as
        many): ``eval_loss``, the mean token loss (a preference objective: the mean pair loss), and
        ``eval_NAME`` for each other sum the eval step returns (a preference objective's
        ``reward_accuracy``, ``reward_margin``, ...). Each is its sum over every batch divided by
        the total weight, so every token or pair counts once, whatever batch it fell in."""
        sums: dict[str, float] = {}
        for local in batches:
            out = jax.device_get(self.eval_step(params, self.global_batch(local)))
            for name, value in out.items():
                sums[name] = sums.get(name, 0.0) + float(value)
        weight_sum = max(sums.pop("weight_sum", 0.0), 1.0)
        loss_sum = sums.pop("loss_sum", 0.0)
        return {"eval_loss": loss_sum / weight_sum,
                **{f"eval_{name}": value / weight_sum for name, value in sums.items()}}

    def evaluate(self, params: Any, batches: list[dict[str, np.ndarray]]) -> float:
        """``eval_metrics``' mean loss alone."""
        return self.eval_metrics(params, batches)["eval_loss"]

    # ------------------------------------------------------------------- compiling ahead of time

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The fields, dtypes and sharding of a training batch (those of the input pipeline)."""
        t = self.cfg.train
        return {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), v.dtype, sharding=self.batch_sharding)
                for k, v in empty_batch(1, t.seq_len).items()}

    def abstract_state(self) -> TrainState:
        """The train state as ShapeDtypeStructs carrying their shardings."""
        return with_shardings(self.trainee.abstract, self.trainee.shardings)

    def _abstract_frozen(self) -> Any:
        abstract, shardings = self.trainee.step_frozen_layout()
        return None if abstract is None else with_shardings(abstract, shardings)

    def lower_train_step(self, batch: Batch | None = None) -> Any:
        """The train step lowered for abstract arguments (nothing allocated); ``batch``: the fields
        of the batches it will take, when they are not the input pipeline's (e.g. no packing)."""
        return self._train_step.lower(self.abstract_state(),
                                      self.abstract_batch() if batch is None else batch,
                                      self._abstract_frozen())

    def lower_eval_step(self, batch: Batch | None = None) -> Any:
        """The eval step lowered for abstract arguments (``batch`` as for ``lower_train_step``)."""
        return self._eval_step.lower(self.abstract_state().params,
                                     self.abstract_batch() if batch is None else batch,
                                     self._abstract_frozen())

    def state_bytes_per_device(self) -> int:
        """Bytes of train state one device holds."""
        tr = self.trainee
        return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                   for a, s in zip(jax.tree.leaves(tr.abstract), jax.tree.leaves(tr.shardings),
                                   strict=True))


def memory_report(compiled: Any) -> dict[str, int]:
    """Per-device memory of a compiled program (XLA's analysis, bytes): arguments, outputs (aliased =
    donated inputs reused), temporaries, code, and the total live at the peak; {} when XLA gives no
    analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    out = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
           "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
           "code": stats.generated_code_size_in_bytes}
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    return out
