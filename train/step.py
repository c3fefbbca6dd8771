"""Pure train and eval steps over (state, batch); ``train/program.py`` jits them once with explicit
shardings.

Loss: next-token cross-entropy (``model/loss.py``) summed over weighted target positions and divided
by the weight sum, in float32. An MoE model adds its weighted load-balancing and z-losses to the
differentiated objective (``loss`` stays the pure cross-entropy) and reports its router metrics;
multi-token prediction (``mtp_depth``) adds mtp_loss_weight times its loss (``mtp_loss``, the mean
over depths of ``mtp_loss_per_depth``).
Gradient accumulation scans over microbatches inside the step, so the update equals the full-batch update
(MoE and MTP auxiliaries: averaged over microbatches, weighted by their tokens).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model.loss import nll_sums
from model.moe import load_max_over_mean, updated_router_bias
from sharding.constrain import constrain
from train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# Multi-token prediction's metrics, when the model has it: its mean loss, the loss of each depth and
# (MoE blocks) their expert load [D, E], kept apart from the main layers' ``expert_load``.
MTP_METRICS = ("mtp_loss", "mtp_loss_per_depth", "mtp_expert_load")


def _model(params: nnx.State, graphdef: nnx.GraphDef, frozen: nnx.State | None) -> nnx.Module:
    """The model of ``params`` (plus ``frozen``: a fine-tune's untrained state, merged in)."""
    return nnx.merge(graphdef, params, *(() if frozen is None else (frozen,)))


def objective_sums(params: nnx.State, graphdef: nnx.GraphDef, batch: Batch,
                   frozen: nnx.State | None = None
                   ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Metrics]]:
    """(what training differentiates, (loss sum, weight sum, MoE and MTP metrics times the weight
    sum)).

    Everything is a sum over tokens, so microbatches add up: the objective is the loss sum plus the
    weighted auxiliaries (MoE router losses, mtp_loss_weight * mtp_loss) times this batch's weight
    sum."""
    loss_sum, weight_sum, aux = nll_sums(_model(params, graphdef, frozen), batch)
    if not aux:
        return loss_sum, (loss_sum, weight_sum, {})
    metrics = {name: aux[name] for name in MTP_METRICS if name in aux}
    if "aux_loss" in aux:  # an MoE model
        metrics |= {
            "moe_aux_loss": jnp.mean(aux["aux_loss"]), "moe_z_loss": jnp.mean(aux["z_loss"]),
            "moe_dropped_frac": jnp.mean(aux["dropped_frac"]), "expert_load": aux["expert_load"],
            "moe_aux_loss_per_layer": aux["aux_loss"], "moe_z_loss_per_layer": aux["z_loss"],
            "moe_dropped_frac_per_layer": aux["dropped_frac"],
            "moe_seq_aux_loss": jnp.mean(aux["seq_aux_loss"])}
    scaled = {k: v * weight_sum for k, v in metrics.items()}
    return loss_sum + aux["loss"] * weight_sum, (loss_sum, weight_sum, scaled)


def _split_microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...] taking rows with stride n, so each microbatch keeps the batch
    sharding of the whole (every device holds B/n/devices rows of every microbatch), and their
    positions stay split over the length as they came (context parallelism)."""
    def split(x):
        x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch", "length") + (None,) * (x.ndim - 3))
    return jax.tree.map(split, batch)


def grads_loss_and_metrics(params: nnx.State, batch: Batch, frozen: nnx.State | None = None, *,
                           graphdef: nnx.GraphDef, microbatches: int
                           ) -> tuple[nnx.State, jax.Array, Metrics]:
    """Gradients (with respect to ``params`` only, not ``frozen``) of the mean-token objective, the
    mean cross-entropy and the (token-weighted mean) MoE metrics over the batch, accumulated over
    ``microbatches``."""
    grad_fn = jax.value_and_grad(objective_sums, has_aux=True)
    if microbatches == 1:
        (_, (loss_sum, weight_sum, metrics)), grads = grad_fn(params, graphdef, batch, frozen)
    else:
        def body(carry, micro):
            grads_acc, loss_acc, weight_acc, metrics_acc = carry
            (_, (loss_sum, weight_sum, metrics)), grads = grad_fn(params, graphdef, micro, frozen)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
            return (grads_acc, loss_acc + loss_sum, weight_acc + weight_sum, metrics_acc), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)  # f32 accumulators
        micro_batches = _split_microbatches(batch, microbatches)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        metric_zeros = jax.tree.map(jnp.zeros_like,
                                    jax.eval_shape(objective_sums, params, graphdef, first,
                                                   frozen)[1][2])
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), metric_zeros)
        (grads, loss_sum, weight_sum, metrics), _ = jax.lax.scan(body, init, micro_batches)
    denom = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    metrics = jax.tree.map(lambda m: m / denom, metrics)
    return grads, loss_sum / denom, metrics


def load_balance(metrics: Metrics) -> Metrics:
    """What the routing did in this batch, from ``expert_load`` [L_moe, E] (the fraction of
    assignments each expert got): ``moe_load_max_over_mean_per_layer`` (1 = balanced, E / k = every
    token on the same k experts) and its worst layer, ``moe_load_max_over_mean``."""
    if "expert_load" not in metrics:
        return {}
    per_layer = load_max_over_mean(metrics["expert_load"])
    return {"moe_load_max_over_mean": jnp.max(per_layer),
            "moe_load_max_over_mean_per_layer": per_layer}


def with_router_biases_updated(new: nnx.State, old: nnx.State, metrics: Metrics, rate: float,
                               applied: jax.Array) -> nnx.State:
    """``new`` with every aux-loss-free router bias (``router_bias_e`` [L, E]) set from its value in
    ``old`` by ``updated_router_bias`` on the load its layers had in this batch (``expert_load``;
    multi-token prediction's blocks: ``mtp_expert_load``), if the update was ``applied``. The
    bias is outside the gradient (its gradient is 0) and whatever the optimizer made of it is
    replaced here, so weight decay never touches it."""
    def update(path, new_value: jax.Array, old_value: jax.Array) -> jax.Array:
        names = [str(getattr(k, "key", "")) for k in path]
        if "router_bias_e" not in names:
            return new_value
        load_le = metrics["mtp_expert_load" if names[0] == "mtp" else "expert_load"]
        return jnp.where(applied, updated_router_bias(old_value, load_le, rate), old_value)

    return jax.tree_util.tree_map_with_path(update, new, old)


def train_step(state: TrainState, batch: Batch, frozen: nnx.State | None = None, *,
               graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               microbatches: int, router_bias_rate: float = 0.0) -> tuple[TrainState, Metrics]:
    """One optimizer step: ``tx`` gives the update direction, scaled by ``-schedule(state.step)``,
    the learning rate logged as ``lr``. Non-finite guard: if the loss or the gradient norm is not
    finite, the update is skipped -- params and optimizer state stay as they were, so Adam's moments
    and their count (its bias correction) cover the applied updates only; ``skipped`` is 1 -- while
    ``state.step`` still advances (the batch is consumed, and the learning rate, applied and
    logged, follows the step), so step numbers keep matching batches. ``frozen``: model state
    merged in but never trained (a fine-tune's base weights). ``router_bias_rate`` > 0:
    aux-loss-free balancing moves each router bias by the load this batch gave its experts
    (``with_router_biases_updated``), logged as ``moe_router_bias``."""
    grads, loss, moe_metrics = grads_loss_and_metrics(state.params, batch, frozen, graphdef=graphdef,
                                                      microbatches=microbatches)
    params, opt_state, metrics = guarded_update(state, grads, loss, tx=tx, schedule=schedule)
    finite = metrics["skipped"] == 0
    if router_bias_rate:
        params = with_router_biases_updated(params, state.params, moe_metrics, router_bias_rate,
                                            finite)
        moe_blocks = params.get("moe_blocks", {})
        if "router_bias_e" in moe_blocks.get("moe", {}):  # not in a LoRA fine-tune's trained state
            moe_metrics["moe_router_bias"] = moe_blocks["moe"]["router_bias_e"][...]
    metrics |= {**moe_metrics, **load_balance(moe_metrics)}
    return TrainState(state.step + 1, params, opt_state), metrics


def guarded_update(state: TrainState, grads: nnx.State, loss: jax.Array, *,
                   tx: optax.GradientTransformation, schedule: optax.Schedule
                   ) -> tuple[nnx.State, Any, Metrics]:
    """(params, optimizer state, metrics) after ``train_step``'s update from ``grads`` -- skipped
    when ``loss`` or the gradient norm is not finite -- with ``loss``, ``grad_norm``, ``lr`` and
    ``skipped``."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    lr = schedule(state.step)

    def update(params: nnx.State, opt_state: Any) -> tuple[nnx.State, Any]:
        direction, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda d: jnp.asarray(-lr, d.dtype) * d, direction)
        return optax.apply_updates(params, updates), opt_state

    # A conditional rather than a select of new or old values: no extra pass over the state
    # (bench.baby about 5% faster on XLA:CPU).
    params, opt_state = jax.lax.cond(finite, update, lambda params, opt_state: (params, opt_state),
                                     state.params, state.opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
               "skipped": 1 - finite.astype(jnp.int32)}
    return params, opt_state, metrics


def all_finite(tree: Any) -> jax.Array:
    """True if every floating-point leaf of ``tree`` is finite everywhere."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def eval_step(params: nnx.State, batch: Batch, frozen: nnx.State | None = None, *,
              graphdef: nnx.GraphDef) -> Metrics:
    """(sum of weighted token losses, sum of weights) of one batch, as ``loss_sum``, ``weight_sum``."""
    loss_sum, weight_sum, _ = nll_sums(_model(params, graphdef, frozen), batch)
    return {"loss_sum": loss_sum, "weight_sum": weight_sum}
