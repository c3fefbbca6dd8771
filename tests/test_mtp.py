"""Multi-token prediction (DeepSeek-V3): its loss against a hand computation, packed documents kept
apart, the train step on a mesh equal to one device, and ``mtp_depth=0`` leaving the model as it was."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.attention import Span
from model.loss import nll_sums
from model.mtp import depth_batch
from model.transformer import Transformer
from tests import reference
from tests.helpers import SMALL, init_params, loss_grads_and_metrics, random_batch, with_packing
from train.step import objective_sums

TOL_OP = 1e-5  # fp32, simple ops
TOL_MODEL = 1e-4  # fp32, whole models

MTP = dataclasses.replace(SMALL, mtp_depth=2, mtp_loss_weight=0.5)
# Row 0: two documents; row 1: two documents and two padding tokens (segment 0).
SEGMENTS = np.array([[1] * 5 + [2] * 7, [1] * 8 + [2] * 2 + [0] * 2], np.int32)


def _packed_batch(seed: int = 0) -> dict[str, jax.Array]:
    """Two packed rows of 12 tokens, some targets weighted 0 inside documents, padding weight 0."""
    batch = with_packing(random_batch(2, 12, SMALL.vocab_size, seed), SEGMENTS)
    batch["weights"] = batch["weights"] * (SEGMENTS > 0)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _reference_mtp_losses(model: Transformer, batch: dict[str, jax.Array]) -> np.ndarray:
    """Each depth's mean cross-entropy, position by position: module k combines [enorm(Emb(t_{i+k}));
    hnorm(h^{k-1})] @ w_proj (float64), runs its block, then its final norm and the model's head
    (soft-capped), and predicts targets[i+k] where i+k is in the row, in i's document and weighted."""
    inputs, targets, weights, segments = (np.asarray(batch[k]) for k in
                                          ("inputs", "targets", "weights", "segment_ids"))
    b, t = inputs.shape
    eps, table_vd = model.cfg.norm_eps, np.asarray(model.embed.table_vd[...], np.float64)
    head_vd, cap = np.asarray(model.head_weight_vd(), np.float64), model.cfg.final_logit_softcap
    h_btd, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    graphdef, stacked = nnx.split(model.mtp)
    span = Span(batch["positions"], batch["segment_ids"])
    losses = []
    for k in range(1, model.cfg.mtp_depth + 1):
        module = nnx.merge(graphdef, jax.tree.map(lambda a, k=k: a[k - 1], stacked))
        tokens_bt = np.zeros_like(inputs)
        tokens_bt[:, :t - k] = inputs[:, k:]
        x_bt2d = np.concatenate([reference.rms_norm(table_vd[tokens_bt], module.enorm.scale[...], eps),
                                 reference.rms_norm(h_btd, module.hnorm.scale[...], eps)], axis=-1)
        x_btd = x_bt2d @ np.asarray(module.w_proj_2dd[...], np.float64)
        h_btd, _, _ = module.block(jnp.asarray(x_btd, jnp.float32), span, None)
        logits_btv = reference.rms_norm(h_btd, module.final_norm.scale[...], eps) @ head_vd.T
        if cap:
            logits_btv = cap * np.tanh(logits_btv / cap)
        total = count = 0.0
        for row in range(b):
            for i in range(t - k):
                w = weights[row, i + k]
                if w > 0 and segments[row, i + k] == segments[row, i]:
                    lse = np.log(np.sum(np.exp(logits_btv[row, i] - logits_btv[row, i].max())))
                    nll = lse + logits_btv[row, i].max() - logits_btv[row, i, targets[row, i + k]]
                    total, count = total + w * nll, count + w
        losses.append(total / count)
    return np.array(losses)


@pytest.mark.parametrize("options", [{}, {"scan_layers": False, "loss_chunk": 5,
                                           "tie_embeddings": False, "final_logit_softcap": 3.0}])
def test_mtp_loss_equals_a_hand_computation(options):
    """Depth 2 on packed rows with padding: each depth's loss as computed by hand from the same
    weights; ``mtp_loss`` is their mean and the objective adds mtp_loss_weight times it. Also
    unrolled, with the chunked loss and an untied soft-capped head."""
    model = Transformer(dataclasses.replace(MTP, **options), nnx.Rngs(0))
    batch = _packed_batch()
    _, _, aux = nll_sums(model, batch)
    expected = _reference_mtp_losses(model, batch)
    assert reference.relative_error(aux["mtp_loss_per_depth"], expected) < TOL_OP
    assert abs(float(aux["mtp_loss"]) - expected.mean()) < TOL_OP * expected.mean()
    assert abs(float(aux["loss"]) - 0.5 * expected.mean()) < TOL_OP * expected.mean()


def test_depth_targets_stop_at_document_boundaries_and_padding():
    """Depth k at i predicts targets[i+k] with weight weights[i+k], only inside i's document."""
    batch = {"inputs": jnp.arange(6)[None], "targets": jnp.arange(1, 7)[None],
             "weights": jnp.array([[1.0, 1, 0, 1, 1, 0]]),  # target 2 masked, the last is padding
             "segment_ids": jnp.array([[1, 1, 1, 2, 2, 0]])}
    tokens, targets, weights = depth_batch(batch, 1)
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 4, 5, 0]])
    np.testing.assert_array_equal(targets, [[2, 3, 4, 5, 6, 0]])
    np.testing.assert_array_equal(weights, [[1, 0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(depth_batch(batch, 2)[2], [[0, 0, 0, 0, 0, 0]])


def test_packed_documents_give_the_losses_of_separate_rows():
    """One row packing documents A and B has the MTP losses of the two documents in rows of their
    own: no prediction, and no attention of the MTP blocks, crosses the boundary."""
    model = Transformer(MTP, nnx.Rngs(1))
    tokens = np.random.default_rng(3).integers(0, MTP.vocab_size, 13).astype(np.int32)
    packed = with_packing({"inputs": tokens[None, :12], "targets": tokens[None, 1:],
                           "weights": np.ones((1, 12), np.float32)},
                          np.array([[1] * 7 + [2] * 5], np.int32))
    separate = {"inputs": np.zeros((2, 12), np.int32), "targets": np.zeros((2, 12), np.int32),
                "weights": np.zeros((2, 12), np.float32), "positions": np.zeros((2, 12), np.int32),
                "segment_ids": np.zeros((2, 12), np.int32)}
    for row, (start, end) in enumerate([(0, 7), (7, 12)]):
        n = end - start
        separate["inputs"][row, :n] = packed["inputs"][0, start:end]
        separate["targets"][row, :n] = packed["targets"][0, start:end]
        separate["weights"][row, :n] = 1.0
        separate["positions"][row, :n] = np.arange(n)
        separate["segment_ids"][row, :n] = 1
    aux_packed = nll_sums(model, {k: jnp.asarray(v) for k, v in packed.items()})[2]
    aux_separate = nll_sums(model, {k: jnp.asarray(v) for k, v in separate.items()})[2]
    assert reference.relative_error(aux_packed["mtp_loss_per_depth"],
                                    aux_separate["mtp_loss_per_depth"]) < TOL_OP


def test_mtp_depth_0_leaves_the_model_and_its_loss_as_they_were():
    """Without MTP the model has no ``mtp`` parameters, no auxiliaries and the objective is the
    loss; with it the main parameters, logits (generation never runs MTP) and loss (what
    evaluation reports) are the same, its modules being made last, and the objective adds
    mtp_loss_weight * mtp_loss per token."""
    batch = _packed_batch(1)
    graphdef, params = nnx.split(Transformer(SMALL, nnx.Rngs(0)))
    mtp_graphdef, mtp_params = nnx.split(Transformer(MTP, nnx.Rngs(0)))
    plain = dict(nnx.to_flat_state(params))
    main = {path: v for path, v in nnx.to_flat_state(mtp_params) if path[0] != "mtp"}
    assert main.keys() == plain.keys()
    for path, var in plain.items():
        np.testing.assert_array_equal(var[...], main[path][...])
    logits = nnx.merge(graphdef, params)(batch["inputs"])
    np.testing.assert_array_equal(nnx.merge(mtp_graphdef, mtp_params)(batch["inputs"]), logits)
    objective, (loss_sum, _, metrics) = objective_sums(params, graphdef, batch)
    assert metrics == {} and float(objective) == float(loss_sum)
    objective_mtp, (loss_sum_mtp, _, metrics_mtp) = objective_sums(mtp_params, mtp_graphdef, batch)
    assert abs(float(loss_sum_mtp) - float(loss_sum)) <= TOL_OP * float(loss_sum)
    assert set(metrics_mtp) == {"mtp_loss", "mtp_loss_per_depth"}
    assert metrics_mtp["mtp_loss_per_depth"].shape == (2,)
    mtp_term = 0.5 * float(metrics_mtp["mtp_loss"])  # metrics come times the weight sum
    assert abs(float(objective_mtp) - float(loss_sum_mtp) - mtp_term) < TOL_OP * float(objective_mtp)


def test_moe_mtp_train_step_on_a_mesh_equals_one_device(eight_devices):
    """An MoE model with an MoE MTP block (as DeepSeek-V3's): loss, gradients and the MTP metrics
    on data x expert x tensor equal one device's; the MTP block's expert load is reported apart
    from the main layers' and its gradients are not zero."""
    cfg = dataclasses.replace(SMALL, num_experts=8, experts_per_token=2, expert_mlp_dim=16,
                              num_shared_experts=1, mtp_depth=1)
    batch = with_packing(random_batch(8, 16, cfg.vocab_size, seed=5),
                         np.repeat([[1] * 6 + [2] * 10], 8, axis=0).astype(np.int32))
    params = jax.device_get(init_params(cfg))
    loss_1, grads_1, metrics_1 = loss_grads_and_metrics(cfg, {"data": 1}, batch,
                                                        devices=eight_devices[:1], params=params)
    loss_n, grads_n, metrics_n = loss_grads_and_metrics(
        cfg, {"data": 2, "expert": 2, "tensor": 2}, batch, params=params)
    assert abs(loss_n - loss_1) <= TOL_OP * abs(loss_1)
    for a, b in zip(jax.tree.leaves(grads_n), jax.tree.leaves(grads_1), strict=True):
        assert reference.relative_error(a, b) < TOL_OP
    for name in ("mtp_loss", "mtp_loss_per_depth", "mtp_expert_load"):
        assert reference.relative_error(metrics_n[name], metrics_1[name]) < TOL_OP, name
    assert metrics_1["mtp_expert_load"].shape == (1, 8)
    assert metrics_1["expert_load"].shape == (2, 8)
    assert np.abs(grads_1["mtp"]["w_proj_2dd"][...]).max() > 0
