"""The optimizer: warmup + cosine schedule, the weight-decay mask, and the learning rate a step applies
(the logged one, skipped steps or not)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from model.transformer import Transformer
from tests.helpers import SMALL, random_batch
from train.config import OptimConfig
from train.optimizer import decay_mask, lr_schedule, make_optimizer
from train.state import abstract_state, init_state
from train.step import grads_loss_and_metrics, train_step


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    schedule = lr_schedule(cfg, total_steps=110)  # of state step s, the update logged as step s + 1
    assert np.isclose(float(schedule(0)), 1e-4)  # the first update is not wasted at rate 0
    assert np.isclose(float(schedule(4)), 5e-4)
    assert np.isclose(float(schedule(9)), 1e-3)  # logged step 10 ends the warm-up
    assert np.isclose(float(schedule(59)), 1e-4 + 0.5 * (1e-3 - 1e-4))  # cosine midpoint
    assert np.isclose(float(schedule(109)), 1e-4) and np.isclose(float(schedule(499)), 1e-4)


def test_no_weight_decay_on_norm_scales():
    _, params = nnx.split(nnx.eval_shape(lambda: Transformer(SMALL, nnx.Rngs(0))))
    mask = nnx.to_flat_state(decay_mask(params))
    decayed = {"/".join(map(str, path)) for path, v in mask if v.get_value()}
    skipped = {"/".join(map(str, path)) for path, v in mask if not v.get_value()}
    assert skipped == {"blocks/attn_norm/scale", "blocks/mlp_norm/scale", "final_norm/scale"}
    assert "blocks/mlp/w_up_df" in decayed and "embed/table_vd" in decayed
    assert len(jax.tree.leaves(params)) == len(decayed) + len(skipped)


# AdamW with b1 = b2 = 0 and neither weight decay nor clipping moves each parameter by exactly
# -lr * g / (|g| + eps): the parameter change shows the learning rate that was applied.
SIGN_DESCENT = OptimConfig(lr=1e-2, warmup_steps=10, b1=0.0, b2=0.0, weight_decay=0.0, clip_norm=0.0)


@pytest.fixture(scope="module")
def sign_descent():
    """(schedule, jitted train step, jitted gradients, state of step 0) for SIGN_DESCENT."""
    tx, schedule = make_optimizer(SIGN_DESCENT, total_steps=20)
    graphdef, abstract = abstract_state(SMALL, tx)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = init_state(SMALL, tx, 0, jax.tree.map(lambda _: device, abstract))
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                                     microbatches=1))
    grads = jax.jit(lambda p, b: grads_loss_and_metrics(p, b, graphdef=graphdef, microbatches=1)[0])
    return schedule, step, grads, state


def _run(sign_descent, batches: list[dict]) -> tuple[list[float], list[bool], object]:
    """Steps over ``batches``; checks that each applied update used the logged learning rate (a
    skipped step: none). (logged lr of each step, skipped flags, final state)."""
    _, step, grads_fn, state = sign_descent
    lrs, skipped = [], []
    for batch in batches:
        before, grads = jax.device_get((state.params, grads_fn(state.params, batch)))
        state, metrics = step(state, batch)
        lrs.append(float(metrics["lr"]))
        skipped.append(bool(metrics["skipped"]))
        for p, g, new in zip(jax.tree.leaves(before), jax.tree.leaves(grads),
                             jax.tree.leaves(jax.device_get(state.params)), strict=True):
            expected = p if skipped[-1] else p - lrs[-1] * g / (np.sqrt(g * g) + SIGN_DESCENT.eps)
            np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-9)
    return lrs, skipped, state


def _batch(bad: bool = False) -> dict:
    batch = {k: jnp.asarray(v) for k, v in random_batch(4, 8, SMALL.vocab_size).items()}
    return dict(batch, weights=batch["weights"].at[0, 0].set(jnp.nan)) if bad else batch


def test_the_first_update_moves_the_parameters(sign_descent):
    lrs, skipped, state = _run(sign_descent, [_batch()])
    assert not skipped[0] and lrs[0] == pytest.approx(1e-3, rel=1e-6)  # step 1 of a 10-step warm-up
    _, _, _, start = sign_descent
    after, before = jax.device_get((state.params, start.params))
    assert any(not np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True))


def test_after_skipped_steps_the_applied_learning_rate_is_the_logged_one(sign_descent):
    # Steps 2 and 3 (state steps 1 and 2) are skipped; the learning rate keeps following the step
    # number, as logged, and Adam's count (its bias correction) counts the applied updates only.
    schedule = sign_descent[0]
    lrs, skipped, state = _run(sign_descent, [_batch(), _batch(True), _batch(True), _batch(),
                                              _batch()])
    assert skipped == [False, True, True, False, False]
    assert lrs == pytest.approx([float(schedule(s)) for s in range(5)], rel=1e-6)
    assert lrs == pytest.approx([1e-3 * (s + 1) for s in range(5)], rel=1e-6)
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
    assert int(state.step) == 5 and int(adam[0].count) == 3
