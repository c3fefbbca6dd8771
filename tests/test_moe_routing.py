"""MoE routers of issue 21: sigmoid scores, group-limited routing, the aux-loss-free selection bias
and the routed scaling factor against a per-token oracle (outputs and gradients); the bias update
and its balancing of a skewed router; the sequence-wise balance loss and the max/mean load against
hand computations; 64 fine-grained experts on expert-parallel meshes equal to one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ModelConfig
from model.moe import MoE, RouterBias, updated_router_bias
from model.transformer import Transformer
from sharding.constrain import activation_sharding
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules, logical_sharding, tree_shardings
from tests import reference
from tests.test_moe import LAYER, _moe_layer, _probe, _set

TOL_OP = 1e-5  # fp32, simple ops

ROUTED = dataclasses.replace(LAYER, num_experts=8, experts_per_token=3, router_bias_rate=0.01)


def _scores(logits_e: np.ndarray, mode: str) -> np.ndarray:
    if mode.startswith("sigmoid"):
        return 1 / (1 + np.exp(-logits_e))
    return np.exp(logits_e - logits_e.max()) / np.exp(logits_e - logits_e.max()).sum()


def _choose(x_btd, w_router_de, bias_e, mask_bt, cfg: ModelConfig) -> list:
    """One token at a time (float64): chosen[b][t] = its k experts, best first, by score + bias
    among the experts of its best groups (a group's score: the sum of its two best); [] if masked."""
    x, w = np.asarray(x_btd, np.float64), np.asarray(w_router_de, np.float64)
    e, k, groups = cfg.num_experts, cfg.experts_per_token, cfg.router_groups
    size, keep = e // groups, cfg.router_topk_groups or groups
    chosen = []
    for b in range(x.shape[0]):
        row = []
        for t in range(x.shape[1]):
            if not mask_bt[b][t]:
                row.append([])
                continue
            choice = _scores(x[b, t] @ w, cfg.router_mode) + np.asarray(bias_e, np.float64)
            group_score = [sum(sorted(choice[g * size:(g + 1) * size])[-min(2, size):])
                           for g in range(groups)]
            kept_groups = sorted(range(groups), key=lambda g: -group_score[g])[:keep]
            allowed = [i for i in range(e) if i // size in kept_groups]
            row.append(sorted(allowed, key=lambda i: -choice[i])[:k])
        chosen.append(row)
    return chosen


def _oracle(x, mask, layer: MoE, cfg: ModelConfig, chosen: list):
    """The float64 per-token output and its gradients (of sum(out * probe)) for the router and the
    expert weights; every assignment kept."""
    kept = [[[True] * cfg.experts_per_token for _ in row] for row in chosen]
    names = ("w_router_de", "w_up_edf", "w_down_efd", "w_gate_edf")
    with jax.enable_x64(True):
        weights = {n: jnp.asarray(np.asarray(getattr(layer, n)[...]), jnp.float64)
                   for n in names if hasattr(layer, n)}
        x64, probe = jnp.asarray(x, jnp.float64), jnp.asarray(_probe(x.shape), jnp.float64)

        def loss(weights):
            out = reference.moe(x64, *(weights.get(n) for n in names), mode=cfg.router_mode,
                                chosen=chosen, kept=kept, scale=cfg.routed_scaling_factor)
            return jnp.sum(out * probe), out

        grads, out = jax.grad(loss, has_aux=True)(weights)
        return np.asarray(out), {n: np.asarray(g) for n, g in grads.items()}


def _output_and_grads(layer: MoE, x, mask):
    """The layer's output, its routing (experts per token), and the gradients of sum(out * probe)
    for every variable of the layer, by name."""
    layer.set_attributes(sow_intermediates=True)
    graphdef, state = nnx.split(layer)
    probe = jnp.asarray(_probe(x.shape), jnp.float32)

    def loss(state):
        (out, _), sown = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(x, mask)
        return jnp.sum(out * probe), (out, sown["routing_experts"].get_value()[0])

    (_, (out, experts)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    return np.asarray(out), np.asarray(experts), {
        str(path[-1]): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("mode, groups, topk_groups, scale, activation", [
    ("sigmoid_topk", 4, 2, 2.5, "swiglu"),
    ("sigmoid_topk_unnormalized", 2, 1, 1.0, "gelu"),
    ("softmax_topk", 4, 2, 1.5, "swiglu"),
    ("sigmoid_topk", 1, 0, 1.0, "swiglu"),
])
def test_routing_equals_the_per_token_oracle(mode, groups, topk_groups, scale, activation):
    """Outputs and gradients (router, experts) of both paths equal the oracle with a nonzero
    selection bias; the bias takes no gradient; the bias and the groups change some choices."""
    cfg = dataclasses.replace(ROUTED, router_mode=mode, router_groups=groups, activation=activation,
                              router_topk_groups=topk_groups, routed_scaling_factor=scale,
                              capacity_factor=ROUTED.num_experts / ROUTED.experts_per_token)  # C=T
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 8, cfg.d_model)).astype(np.float32)
    mask = rng.random((2, 8)) > 0.2
    bias_e = ((0.3 if mode.startswith("sigmoid") else 0.1) * rng.normal(size=8)).astype(np.float32)
    layer = _moe_layer(cfg)
    _set(layer.router_bias_e, bias_e)
    chosen = _choose(x, layer.w_router_de[...], bias_e, mask, cfg)
    unbiased = _choose(x, layer.w_router_de[...], np.zeros(8), mask, cfg)
    ungrouped = _choose(x, layer.w_router_de[...], bias_e, mask,
                        dataclasses.replace(cfg, router_groups=1, router_topk_groups=0))
    assert chosen != unbiased and (groups == 1 or chosen != ungrouped)
    expected, expected_grads = _oracle(x, mask, layer, cfg, chosen)
    for impl in ("capacity", "dropless"):
        layer_impl = _moe_layer(dataclasses.replace(cfg, moe_impl=impl))
        _set(layer_impl.router_bias_e, bias_e)
        out, experts, grads = _output_and_grads(layer_impl, jnp.asarray(x), jnp.asarray(mask))
        assert [[list(experts[b, t]) for t in range(8) if mask[b, t]] for b in range(2)] == [
            [c for c in row if c] for row in chosen], impl
        assert reference.relative_error(out, expected) < TOL_OP, impl
        assert set(grads) == set(expected_grads) | {"router_bias_e"}
        assert not np.any(grads["router_bias_e"]), impl
        for name, e in expected_grads.items():
            assert reference.relative_error(grads[name], e) < TOL_OP, (impl, name)


def test_the_bias_is_a_router_bias_of_zeros_only_when_its_rate_is_positive():
    # initialised in one jitted program (eagerly, each initialiser compiles one of its own)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: MoE(ROUTED, nnx.Rngs(0))))
    layer = nnx.merge(graphdef, jax.jit(lambda: nnx.split(MoE(ROUTED, nnx.Rngs(0)))[1])())
    assert isinstance(layer.router_bias_e, RouterBias)
    assert not isinstance(layer.router_bias_e, nnx.Param)
    assert layer.router_bias_e[...].dtype == jnp.float32
    assert np.asarray(layer.router_bias_e[...]).tolist() == [0.0] * 8
    assert not hasattr(nnx.eval_shape(
        lambda: MoE(dataclasses.replace(ROUTED, router_bias_rate=0.0), nnx.Rngs(0))),
        "router_bias_e")


def test_the_bias_update_equals_a_hand_computation():
    bias_le = np.array([[0.5, -0.25, 0.0, 1.0], [0.0, 0.125, 0.0, -0.5]], np.float32)
    load_le = np.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]], np.float32)
    # Layer 0: mean 0.25, so expert 0 (over) moves down, expert 3 (under) up, experts 1, 2 stay;
    # layer 1 is balanced and stays.
    expected = [[0.5 - 0.1, -0.25, 0.0, 1.0 + 0.1], [0.0, 0.125, 0.0, -0.5]]
    got = updated_router_bias(jnp.asarray(bias_le), jnp.asarray(load_le), 0.1)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-7)


SKEW_STEPS = 30  # the stated number of bias updates within which max/mean load falls below 1.5


def test_aux_loss_free_balancing_evens_out_a_skewed_router():
    """16 experts, top-2, a router whose logits favour 4 experts by +3, on fixed random tokens (no
    training). Without balancing nothing changes the routing: max/mean load stays above 3 at every
    step. With the bias update (rate 0.005) it falls below 1.5 within SKEW_STEPS steps and stays
    there; load_max_over_mean reports max/mean of expert_load."""
    cfg = dataclasses.replace(LAYER, num_experts=16, experts_per_token=2, router_mode="sigmoid_topk",
                              router_bias_rate=0.005, moe_impl="dropless")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 64, cfg.d_model)).astype(np.float32)
    x[..., 0] = 1.0
    layer = _moe_layer(cfg)
    w = 0.5 * rng.normal(size=(cfg.d_model, 16))
    w[0] = 0.0
    w[0, :4] = 3.0
    _set(layer.w_router_de, w)
    graphdef, state = nnx.split(layer)
    metrics_of = jax.jit(lambda state: nnx.merge(graphdef, state)(jnp.asarray(x))[1])
    ratios = []
    for _ in range(2 * SKEW_STEPS):
        metrics = metrics_of(state)
        load_e = np.asarray(metrics["expert_load"])
        ratios.append(float(metrics["load_max_over_mean"]))
        assert ratios[-1] == pytest.approx(load_e.max() / load_e.mean(), rel=TOL_OP)
        state["router_bias_e"].set_value(updated_router_bias(
            state["router_bias_e"][...][None], jnp.asarray(load_e)[None], cfg.router_bias_rate)[0])
    assert ratios[0] > 3  # the unbalanced router, every step without balancing
    settled = next(i for i, r in enumerate(ratios) if r < 1.5)
    assert settled <= SKEW_STEPS, ratios
    assert max(ratios[settled:]) < 1.5, ratios


def test_sequence_wise_loss_and_load_equal_a_hand_computation():
    """seq_aux_loss = token-weighted mean over rows of sum_e f_be P_be (f_be = E / (k T_b) * row b's
    assignments to e, P_be = row b's mean of the scores normalised over the experts), with padding,
    and its gradient for the router; the Switch loss uses the same normalised scores; the model adds
    seq_aux_loss_coef times its mean over MoE layers to the auxiliary objective."""
    cfg = dataclasses.replace(ROUTED, router_mode="sigmoid_topk", router_groups=4,
                              router_topk_groups=2, seq_aux_loss_coef=0.3)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 8, cfg.d_model)).astype(np.float32)
    mask = np.ones((3, 8), bool)
    mask[0, 5:], mask[2, 2:] = False, False  # rows of 5, 8 and 2 tokens
    layer = _moe_layer(cfg)
    bias_e = (0.3 * rng.normal(size=8)).astype(np.float32)
    _set(layer.router_bias_e, bias_e)
    graphdef, state = nnx.split(layer)

    def seq_loss(state):
        metrics = nnx.merge(graphdef, state)(jnp.asarray(x), jnp.asarray(mask))[1]
        return metrics["seq_aux_loss"], metrics

    (_, metrics), grads = jax.jit(jax.value_and_grad(seq_loss, has_aux=True))(state)

    chosen = _choose(x, layer.w_router_de[...], bias_e, mask, cfg)
    e, k = cfg.num_experts, cfg.experts_per_token
    counts = np.array([[sum(i in c for c in row) for i in range(e)] for row in chosen], float)
    tokens = mask.sum(1)

    def hand(w_de):  # float64; the choices (counts) fixed, as top-k passes no gradient
        s = 1 / (1 + jnp.exp(-jnp.asarray(x, jnp.float64) @ w_de))
        p = s / s.sum(-1, keepdims=True)
        seq = [e / (k * tokens[b]) * counts[b] @ p[b][mask[b]].mean(0) for b in range(3)]
        return jnp.dot(jnp.asarray(tokens, jnp.float64), jnp.stack(seq)) / tokens.sum(), p

    with jax.enable_x64(True):
        w64 = jnp.asarray(np.asarray(layer.w_router_de[...]), jnp.float64)
        (expected, p), expected_grad = jax.value_and_grad(hand, has_aux=True)(w64)
        p = np.asarray(p)
    load = counts.sum(0) / (k * tokens.sum())
    assert float(metrics["seq_aux_loss"]) == pytest.approx(float(expected), rel=TOL_OP)
    assert np.abs(expected_grad).max() > 0
    assert reference.relative_error(grads["w_router_de"][...], expected_grad) < TOL_OP
    assert float(metrics["aux_loss"]) == pytest.approx(e * load @ p[mask].mean(0), rel=TOL_OP)
    assert float(metrics["load_max_over_mean"]) == pytest.approx(load.max() * e, rel=TOL_OP)

    model_cfg = dataclasses.replace(cfg, num_layers=2, first_dense_layers=1)
    model = Transformer(model_cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens_bt = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    _, aux = jax.jit(lambda s: nnx.merge(graphdef, s).hidden(tokens_bt))(state)
    expected = (cfg.aux_loss_coef * aux["aux_loss"].mean() + cfg.z_loss_coef * aux["z_loss"].mean()
                + cfg.seq_aux_loss_coef * aux["seq_aux_loss"].mean())
    assert float(aux["loss"]) == pytest.approx(float(expected), rel=TOL_OP)
    assert aux["seq_aux_loss"].shape == aux["load_max_over_mean"].shape == (1,)


FINE = dataclasses.replace(LAYER, d_model=16, num_experts=64, experts_per_token=8, expert_mlp_dim=4,
                           num_shared_experts=1, router_mode="sigmoid_topk", router_groups=8,
                           router_topk_groups=4, router_bias_rate=0.001, routed_scaling_factor=2.5)


def _sharded_layer_run(layer: MoE, x, mask, mesh_axes: dict | None):
    """(output, metrics) of the layer, its variables and inputs sharded on the mesh (or no mesh)."""
    graphdef, state = nnx.split(layer)
    run = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m))
    if mesh_axes is None:
        return jax.device_get(run(state, x, mask))
    mesh, rules = make_mesh(MeshConfig(**mesh_axes)), default_rules()
    with activation_sharding(mesh, rules):
        # from host copies: resharding device arrays compiles a slicing program per shape
        state = jax.device_put(jax.device_get(state), tree_shardings(state, mesh, rules))
        x = jax.device_put(np.asarray(x),
                           logical_sharding(("batch", "length", "embed"), x.shape, mesh, rules))
        mask = jax.device_put(np.asarray(mask),
                              logical_sharding(("batch", "length"), mask.shape, mesh, rules))
        return jax.device_get(run(state, x, mask))


@pytest.mark.parametrize("impl", ["capacity", "dropless"])
def test_64_experts_on_expert_parallel_meshes_equal_one_device(eight_devices, impl):
    """64 experts, top-8 within 4 of 8 groups, a selection bias, one shared expert: the layer's
    output and metrics on expert=8, data=2 x expert=4 and fsdp=2 x expert=4 equal no mesh."""
    cfg = dataclasses.replace(FINE, moe_impl=impl)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(8, 8, cfg.d_model)), jnp.float32)
    mask = jnp.asarray(rng.random((8, 8)) > 0.1)
    layer = _moe_layer(cfg)
    _set(layer.router_bias_e, 0.05 * rng.normal(size=64))
    expected_out, expected_metrics = _sharded_layer_run(layer, x, mask, None)
    if impl == "capacity":
        assert expected_metrics["dropped_frac"] > 0  # capacity 1.25: the drops must agree too
    for mesh_axes in ({"expert": 8}, {"data": 2, "expert": 4}, {"fsdp": 2, "expert": 4}):
        out, metrics = _sharded_layer_run(layer, x, mask, mesh_axes)
        assert reference.relative_error(out, expected_out) < TOL_OP, mesh_axes
        for name, value in expected_metrics.items():
            assert reference.relative_error(metrics[name], value) < TOL_OP, (mesh_axes, name)
