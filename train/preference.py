"""Preference objectives over batches of pairs (``data/preference.py``: row 2k is pair k's chosen
response, row 2k+1 its rejected one, weights 1 on the response's targets): pure train and eval
steps that ``train/program.py`` jits like the next-token ones.

π = a response's summed log-probability (``model/loss.py: sequence_nll``), |y| its token count.
- DPO (Rafailov et al. 2023): rewards r = β (π - π_ref) under the frozen reference model, z = r_c -
  r_r, loss = -(1 - ε) log σ(z) - ε log σ(-z) (ε = ``dpo_label_smoothing``: conservative DPO).
- SimPO (Meng et al. 2024), reference-free: r = β π / |y|, loss = -log σ(r_c - r_r - γ).
Metrics, means over the batch's pairs: ``loss``, ``reward_margin`` (r_c - r_r), ``reward_accuracy``
(r_c > r_r), ``logp_chosen`` and ``logp_rejected`` (π). Microbatches take whole pairs (``split_pairs``)
and everything is summed per pair, so the accumulated gradient is the full batch's. MoE and
multi-token-prediction auxiliary losses are not added to these objectives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model.loss import sequence_nll
from sharding.constrain import constrain
from train.config import FinetuneConfig
from train.state import TrainState
from train.step import Batch, Metrics, guarded_update

PAIR_METRICS = ("reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected")
# (frozen step input) -> the reference model (DPO), or None (SimPO)
ReferenceFn = Callable[[Any], nnx.Module | None]


@dataclasses.dataclass(frozen=True)
class Objective:
    """Which preference loss and its constants."""

    kind: str  # "dpo" or "simpo"
    beta: float
    label_smoothing: float = 0.0
    gamma: float = 0.0

    @classmethod
    def of(cls, ft: FinetuneConfig) -> Objective:
        if ft.objective == "dpo":
            return cls("dpo", ft.dpo_beta, label_smoothing=ft.dpo_label_smoothing)
        return cls("simpo", ft.simpo_beta, gamma=ft.simpo_gamma)


def pair_losses(logp_pc: jax.Array, ref_pc: jax.Array, length_pc: jax.Array,
                objective: Objective) -> tuple[jax.Array, jax.Array]:
    """(loss [P], rewards [P, 2]) of pairs from their responses' log-probabilities ``logp_pc``
    (column 0 chosen, 1 rejected), the reference's ``ref_pc`` (DPO) and token counts."""
    if objective.kind == "dpo":
        rewards_pc = objective.beta * (logp_pc - ref_pc)
        z_p = rewards_pc[:, 0] - rewards_pc[:, 1]
        eps = objective.label_smoothing
        loss_p = -(1 - eps) * jax.nn.log_sigmoid(z_p) - eps * jax.nn.log_sigmoid(-z_p)
        return loss_p, rewards_pc
    rewards_pc = objective.beta * logp_pc / jnp.maximum(length_pc, 1.0)
    return -jax.nn.log_sigmoid(rewards_pc[:, 0] - rewards_pc[:, 1] - objective.gamma), rewards_pc


def _pairs(x_b: jax.Array) -> jax.Array:
    return x_b.reshape(-1, 2)


def preference_sums(params: nnx.State, graphdef: nnx.GraphDef, batch: Batch, frozen: dict, *,
                    objective: Objective, reference: ReferenceFn
                    ) -> tuple[jax.Array, tuple[jax.Array, Metrics]]:
    """(sum of the pairs' losses, (number of pairs, sums of ``PAIR_METRICS``)). A pair whose rows
    have no response token (evaluation padding) counts for nothing."""
    policy = nnx.merge(graphdef, params, frozen["model"])
    logp_pc = _pairs(-sequence_nll(policy, batch))
    length_pc = _pairs(jnp.sum(batch["weights"].astype(jnp.float32), axis=-1))
    ref_pc = jnp.zeros_like(logp_pc)
    if (ref_model := reference(frozen)) is not None:
        ref_batch = {k: v for k, v in batch.items() if k != "rows"}
        ref_pc = _pairs(jax.lax.stop_gradient(-sequence_nll(ref_model, ref_batch)))
    loss_p, rewards_pc = pair_losses(logp_pc, ref_pc, length_pc, objective)
    real_p = jnp.all(length_pc > 0, axis=-1).astype(jnp.float32)
    margin_p = rewards_pc[:, 0] - rewards_pc[:, 1]
    sums = {"reward_margin": margin_p, "reward_accuracy": (margin_p > 0).astype(jnp.float32),
            "logp_chosen": logp_pc[:, 0], "logp_rejected": logp_pc[:, 1]}
    sums = {k: jnp.sum(v * real_p) for k, v in sums.items()}
    return jnp.sum(loss_p * real_p), (jnp.sum(real_p), sums)


def split_pairs(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...]: microbatch j holds pairs j, j+n, j+2n, ..., each pair's two rows
    side by side as they came (the stride keeps every microbatch spread over the batch shards)."""
    def split(x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0] // (2 * n), n, 2) + x.shape[1:]).swapaxes(0, 1)
        x = x.reshape((n, -1) + x.shape[3:])
        return constrain(x, ((None, "batch", "length") + (None,) * x.ndim)[:x.ndim])
    return jax.tree.map(split, batch)


def preference_grads(params: nnx.State, batch: Batch, frozen: dict, *, graphdef: nnx.GraphDef,
                     objective: Objective, reference: ReferenceFn, microbatches: int
                     ) -> tuple[nnx.State, jax.Array, Metrics]:
    """Gradients of the mean pair loss, the mean loss and the mean ``PAIR_METRICS`` of the batch,
    accumulated over ``microbatches`` of whole pairs."""
    grad_fn = jax.value_and_grad(preference_sums, has_aux=True)
    kwargs = {"objective": objective, "reference": reference}
    if microbatches == 1:
        (loss_sum, (pairs, sums)), grads = grad_fn(params, graphdef, batch, frozen, **kwargs)
    else:
        def body(carry: tuple, micro: Batch) -> tuple[tuple, None]:
            (loss_sum, (pairs, sums)), grads = grad_fn(params, graphdef, micro, frozen, **kwargs)
            return jax.tree.map(jnp.add, carry, (grads, loss_sum, pairs, sums)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)  # f32 accumulators
        scalar = jnp.zeros((), jnp.float32)
        init = (zeros, scalar, scalar, dict.fromkeys(PAIR_METRICS, scalar))
        (grads, loss_sum, pairs, sums), _ = jax.lax.scan(body, init, split_pairs(batch, microbatches))
    denom = jnp.maximum(pairs, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    return grads, loss_sum / denom, {k: v / denom for k, v in sums.items()}


def preference_train_step(state: TrainState, batch: Batch, frozen: dict, *, graphdef: nnx.GraphDef,
                          tx: optax.GradientTransformation, schedule: optax.Schedule,
                          objective: Objective, reference: ReferenceFn, microbatches: int
                          ) -> tuple[TrainState, Metrics]:
    """One optimizer step on the preference loss (non-finite guard as ``train.step.train_step``)."""
    grads, loss, metrics = preference_grads(state.params, batch, frozen, graphdef=graphdef,
                                            objective=objective, reference=reference,
                                            microbatches=microbatches)
    params, opt_state, update_metrics = guarded_update(state, grads, loss, tx=tx, schedule=schedule)
    return TrainState(state.step + 1, params, opt_state), {**update_metrics, **metrics}


def preference_eval_step(params: nnx.State, batch: Batch, frozen: dict, *, graphdef: nnx.GraphDef,
                         objective: Objective, reference: ReferenceFn) -> Metrics:
    """``loss_sum`` (the pairs' losses) and ``weight_sum`` (the number of pairs) of one batch, and
    the sums of ``PAIR_METRICS``."""
    loss_sum, (pairs, sums) = preference_sums(params, graphdef, batch, frozen, objective=objective,
                                              reference=reference)
    return {"loss_sum": loss_sum, "weight_sum": pairs, **sums}
