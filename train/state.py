"""TrainState (step, params, optimizer state) and its creation directly in its sharded layout:
shapes come from ``nnx.eval_shape``, values from a jit whose ``out_shardings`` place every shard on
its device, so no full copy ever sits on one device or the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model.config import ModelConfig
from model.transformer import Transformer


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation,
                   seed: int = 0) -> tuple[nnx.GraphDef, TrainState]:
    """The model's graphdef and a TrainState of ShapeDtypeStructs (no memory allocated)."""
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(seed)))
    graphdef, params = nnx.split(model)
    opt_state = jax.eval_shape(tx.init, params)
    return graphdef, TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_state)


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
               shardings: TrainState) -> TrainState:
    """Fresh parameters and optimizer state, created sharded by ``shardings``."""

    def init() -> TrainState:
        _, params = nnx.split(Transformer(cfg, nnx.Rngs(seed)))
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    return jax.jit(init, out_shardings=shardings)()


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry their target sharding (what orbax needs to restore onto a mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
