"""Mixture of Experts: the capacity and dropless paths against the per-token oracle, capacity drops,
auxiliary losses, expert parallelism equal to one device, layouts, training, configuration errors."""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cli import train as train_cli
from model.config import ModelConfig
from model.flops import param_counts
from model.loss import lm_logits
from model.moe import MoE, RouterBias, capacity_positions
from model.transformer import Transformer
from sharding.constrain import activation_sharding
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules, tree_shardings
from tests import reference
from tests.helpers import SMALL, init_params, loss_and_grads, random_batch, small_text
from train.config import CONFIG_DIR, build_config, load_yaml
from train.loop import train
from train.validate import validate

TOL_OP = 1e-5  # fp32, simple ops
TOL_MODEL = 1e-4  # fp32, whole models
ROOT = Path(__file__).resolve().parent.parent

LAYER = ModelConfig(vocab_size=16, d_model=8, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=8,
                    max_seq_len=8, num_experts=4, experts_per_token=2, expert_mlp_dim=6)
SMALL_MOE = dataclasses.replace(SMALL, num_experts=8, experts_per_token=2, expert_mlp_dim=16,
                                num_shared_experts=1)


def _moe_layer(cfg: ModelConfig, seed: int = 0) -> MoE:
    """An MoE layer with well-spread random weights (router logits of order 1), its selection bias
    (if any) zero and its shared experts' weights of the configured init scale. Made abstract and
    filled from NumPy: running its initialisers would compile a program per new shape."""
    layer = nnx.eval_shape(lambda: MoE(cfg, nnx.Rngs(0)))
    rng, other_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1000)
    routed = {name: (1.0 if name == "w_router_de" else 0.4) * rng.normal(
        size=getattr(layer, name).get_value().shape)
        for name in ("w_router_de", "w_gate_edf", "w_up_edf", "w_down_efd") if hasattr(layer, name)}
    for path, var in nnx.iter_graph(layer):
        if isinstance(var, nnx.Variable):
            abstract = var.get_value()
            value = routed.get(str(path[-1]))
            if value is None:
                value = (np.zeros(abstract.shape) if isinstance(var, RouterBias)
                         else cfg.init_std * other_rng.normal(size=abstract.shape))
            var.set_value(jnp.asarray(value, abstract.dtype))
    return layer


def _set(var: nnx.Variable, value) -> None:
    """Sets a variable to a host array (as a whole: indexed assignment compiles a scatter)."""
    var.set_value(jnp.asarray(value, var.get_value().dtype))


def _weights(layer: MoE) -> list:
    return [layer.w_router_de[...], layer.w_up_edf[...], layer.w_down_efd[...],
            layer.w_gate_edf[...] if hasattr(layer, "w_gate_edf") else None]


def _oracle(x, mask, weights, cfg, capacity=None, with_grads=True):
    """The float64 per-token oracle's output, gradients (of sum(out * probe); None without
    ``with_grads``, which saves compiling the backward pass's ops) and kept lists."""
    chosen, kept = reference.moe_routing(x, weights[0], k=cfg.experts_per_token, capacity=capacity,
                                         mask_bt=mask)
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(a), jnp.float64) if a is not None else None
                for a in [x, *weights]]
        probe = jnp.asarray(_probe(x.shape), jnp.float64)

        def loss(args):
            out = reference.moe(*args, mode=cfg.router_mode, chosen=chosen, kept=kept)
            return jnp.sum(out * probe), out

        if not with_grads:
            return np.asarray(loss(args)[1]), None, kept
        grads, out = jax.grad(loss, has_aux=True)(args)
        return np.asarray(out), [None if g is None else np.asarray(g) for g in grads], kept


def _jit_call(layer: MoE, *args):
    graphdef, state = nnx.split(layer)
    return jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))(state, *args)


def _probe(shape):
    return np.random.default_rng(99).normal(size=shape)


def _layer_output_and_grads(layer: MoE, x, mask):
    """The layer's output, and gradients of sum(out * probe) for x and the four expert weights."""
    graphdef, state = nnx.split(layer)
    probe = jnp.asarray(_probe(x.shape), jnp.float32)

    def loss(state, x):
        out, _ = nnx.merge(graphdef, state)(x, mask)
        return jnp.sum(out * probe), out

    (_, out), (g_state, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        state, x)
    names = ("w_router_de", "w_up_edf", "w_down_efd", "w_gate_edf")
    return np.asarray(out), [np.asarray(g_x)] + [
        np.asarray(g_state[n][...]) if n in g_state else None for n in names]


@pytest.mark.parametrize("router_mode, activation, masked", [
    ("softmax_topk", "swiglu", False),
    ("topk_softmax", "gelu", True),
    ("softmax_topk_unnormalized", "swiglu", True),
])
def test_capacity_and_dropless_equal_the_oracle_with_ample_capacity(router_mode, activation, masked):
    cfg = dataclasses.replace(LAYER, router_mode=router_mode, activation=activation,
                              capacity_factor=LAYER.num_experts / LAYER.experts_per_token)  # C = T
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 8, cfg.d_model)).astype(np.float32)
    mask = rng.random((2, 8)) > 0.25 if masked else np.ones((2, 8), bool)
    layer = _moe_layer(cfg)
    expected, expected_grads, kept = _oracle(x, mask, _weights(layer), cfg)
    assert all(all(choice) for row, m in zip(kept, mask, strict=True)
               for choice, on in zip(row, m, strict=True) if on)  # nothing dropped
    for impl in ("capacity", "dropless"):
        layer_impl = _moe_layer(dataclasses.replace(cfg, moe_impl=impl))
        out, grads = _layer_output_and_grads(layer_impl, jnp.asarray(x), jnp.asarray(mask))
        assert reference.relative_error(out, expected) < TOL_OP, impl
        for name, g, e in zip(("x", "router", "up", "down", "gate"), grads, expected_grads,
                              strict=True):
            assert (g is None) == (e is None), name
            if g is not None:
                assert reference.relative_error(g, e) < TOL_OP, (impl, name)


def test_tight_capacity_drops_exactly_the_overflowing_tokens():
    # Router = identity on 4 dims, so each token's logits are its vector: its first and second
    # choices are the positions of its 4 and its 3.
    cfg = dataclasses.replace(LAYER, d_model=4, capacity_factor=0.5)  # C = ceil(0.5 * 6 * 2 / 4) = 2
    logits = np.array([[4, 3, 0, 0],   # t0 -> e0 (slot 0), e1 (slot 0)
                       [4, 0, 3, 0],   # t1 -> e0 (slot 1), e2 (slot 0)
                       [3, 4, 0, 0],   # t2 -> e1 (slot 1), e0 full: dropped
                       [4, 0, 0, 3],   # t3 -> e0 full: dropped, e3 (slot 0)
                       [0, 4, 3, 0],   # t4 -> e1 full: dropped, e2 (slot 1)
                       [3, 0, 4, 0]],  # t5 -> e2 full, e0 full: both dropped
                      np.float32)[None]
    expected_kept = [[[True, True], [True, True], [True, False], [False, True], [False, True],
                      [False, False]]]
    assert cfg.expert_capacity(6) == 2
    layer = _moe_layer(cfg)
    _set(layer.w_router_de, np.eye(4))
    experts = np.argsort(-logits, axis=-1, kind="stable")[..., :2]
    # jitted: one program instead of one per eager op
    _, kept = jax.jit(capacity_positions, static_argnums=(2, 3))(experts, np.ones((1, 6), bool), 4, 2)
    assert kept.tolist() == expected_kept
    mask = np.ones((1, 6), bool)
    expected, _, oracle_kept = _oracle(logits, mask, _weights(layer), cfg, capacity=2,
                                       with_grads=False)
    assert oracle_kept == expected_kept
    out, metrics = _jit_call(layer, jnp.asarray(logits), jnp.asarray(mask))
    assert reference.relative_error(out, expected) < TOL_OP
    assert np.all(np.asarray(out)[0, 5] == 0)  # fully dropped: only the residual carries it
    assert float(metrics["dropped_frac"]) == pytest.approx(5 / 12)
    assert np.asarray(metrics["expert_load"]) == pytest.approx([5 / 12, 3 / 12, 3 / 12, 1 / 12])


def _hand_aux(logits, k):
    """Switch loss and z-loss written out: E * sum_e f_e P_e and mean lse^2."""
    n, e = logits.shape
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    chosen = np.argsort(-logits, axis=-1)[:, :k]
    f = np.array([(chosen == i).sum() for i in range(e)]) / (n * k)
    lse = np.log(np.exp(logits).sum(-1))
    return e * np.sum(f * probs.mean(0)), np.mean(lse ** 2), probs, f, lse


def test_aux_losses_equal_a_hand_computation_and_reach_the_router():
    cfg = dataclasses.replace(LAYER, d_model=4, aux_loss_coef=0.5, z_loss_coef=0.25)
    logits = np.array([[2.0, 1.0, 0.0, -1.0], [0.5, 3.0, -2.0, 0.0], [1.0, 0.0, 2.5, 0.2],
                       [2.2, -0.3, 0.1, 1.2]], np.float32)
    layer = _moe_layer(cfg)
    x = jnp.asarray(logits[None])  # with the identity router, logits = x

    # Zero router: uniform probabilities, so aux = E * sum_e f_e / E = 1 and z = log(E)^2.
    _set(layer.w_router_de, np.zeros((4, 4)))
    _, metrics = _jit_call(layer, x)
    assert float(metrics["aux_loss"]) == pytest.approx(1.0, rel=TOL_OP)
    assert float(metrics["z_loss"]) == pytest.approx(math.log(4) ** 2, rel=TOL_OP)

    _set(layer.w_router_de, np.eye(4))
    aux, z, probs, f, lse = _hand_aux(logits, k=2)
    _, metrics = _jit_call(layer, x)
    assert float(metrics["aux_loss"]) == pytest.approx(aux, rel=TOL_OP)
    assert float(metrics["z_loss"]) == pytest.approx(z, rel=TOL_OP)

    graphdef, state = nnx.split(layer)

    def weighted(state):
        _, m = nnx.merge(graphdef, state)(x)
        return cfg.aux_loss_coef * m["aux_loss"] + cfg.z_loss_coef * m["z_loss"]

    grad_router = np.asarray(jax.jit(jax.grad(weighted))(state)["w_router_de"][...])
    # d/dlogits: aux -> (E / N) p_nj (f_j - sum_e f_e p_ne); z -> 2 lse_n p_nj / N; x = identity rows.
    n, e = logits.shape
    d_aux = e / n * probs * (f[None] - (probs * f[None]).sum(-1, keepdims=True))
    d_z = 2 * lse[:, None] * probs / n
    expected = logits.T @ (cfg.aux_loss_coef * d_aux + cfg.z_loss_coef * d_z)
    assert np.abs(grad_router).max() > 0
    assert reference.relative_error(grad_router, expected) < TOL_OP


def _init_params(cfg: ModelConfig) -> nnx.State:
    """Seed-0 parameters on the host (one jitted init, shared by every mesh of a comparison)."""
    return jax.device_get(init_params(cfg))


def _loss_and_grads(cfg: ModelConfig, params: nnx.State, mesh_axes: dict, batch: dict,
                    devices: list | None = None, microbatches: int = 1):
    """(loss, host grads) of ``params`` on the given mesh (without initialising them again)."""
    return loss_and_grads(cfg, mesh_axes, batch, microbatches, devices, params=params)


def _assert_same(result, expected):
    (loss_n, grads_n), (loss_1, grads_1) = result, expected
    assert abs(loss_n - loss_1) <= TOL_OP * abs(loss_1)
    for a, b in zip(jax.tree.leaves(grads_n), jax.tree.leaves(grads_1), strict=True):
        assert reference.relative_error(a, b) < TOL_OP


@pytest.fixture(scope="module")
def single_device_moe(eight_devices):
    batch = random_batch(8, 16, SMALL_MOE.vocab_size, seed=2)
    params = _init_params(SMALL_MOE)
    return batch, params, _loss_and_grads(SMALL_MOE, params, {"data": 1}, batch, eight_devices[:1])


@pytest.mark.parametrize("mesh_axes", [
    {"data": 1, "expert": 8}, {"data": 2, "expert": 4},
    {"data": 1, "fsdp": 2, "tensor": 2, "expert": 2},
])
def test_expert_parallel_loss_and_grads_equal_single_device(single_device_moe, mesh_axes):
    batch, params, expected = single_device_moe
    _assert_same(_loss_and_grads(SMALL_MOE, params, mesh_axes, batch), expected)


def test_a_batch_too_small_to_split_keeps_the_experts_whole(single_device_moe):
    """One row on an expert=8 mesh (as when sampling): the tokens cannot be split, so the experts
    are not either, and the result equals the run without a mesh."""
    _, params, _ = single_device_moe
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(SMALL_MOE, nnx.Rngs(0))))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 64, (1, 16)), jnp.int32)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    expected = forward(params, tokens)
    mesh, rules = make_mesh(MeshConfig(data=1, expert=8)), default_rules()
    with activation_sharding(mesh, rules):
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(SMALL_MOE, nnx.Rngs(0))))
        logits = forward(jax.device_put(params, tree_shardings(abstract, mesh, rules)), tokens)
    assert reference.relative_error(logits, expected) < TOL_OP


def test_microbatches_equal_the_full_batch_without_auxiliary_losses(eight_devices):
    """Routing groups are rows, so accumulation changes nothing but the auxiliaries (which are
    averaged over microbatches): with their coefficients 0 the update equals the full batch's."""
    cfg = dataclasses.replace(SMALL_MOE, aux_loss_coef=0.0, z_loss_coef=0.0)
    batch = random_batch(16, 16, cfg.vocab_size, seed=4)
    mesh_axes, params = {"data": 2, "expert": 4}, _init_params(cfg)
    full = _loss_and_grads(cfg, params, mesh_axes, batch, microbatches=1)
    _assert_same(_loss_and_grads(cfg, params, mesh_axes, batch, microbatches=2), full)


def test_dropless_on_a_mesh_equals_single_device(eight_devices):
    cfg = dataclasses.replace(SMALL_MOE, moe_impl="dropless", num_shared_experts=0)
    batch = random_batch(8, 16, cfg.vocab_size, seed=3)
    params = _init_params(cfg)
    expected = _loss_and_grads(cfg, params, {"data": 1}, batch, eight_devices[:1])
    _assert_same(_loss_and_grads(cfg, params, {"data": 2, "tensor": 2, "expert": 2}, batch), expected)


@pytest.mark.parametrize("activation, mesh_axes", [
    ("swiglu", None), ("gelu", None), ("swiglu", {"data": 2, "tensor": 2, "expert": 2}),
])
def test_megablox_layer_equals_ragged_dot(eight_devices, activation, mesh_axes):
    """The dropless layer with moe_matmul=megablox (the Pallas kernel, interpreted on CPU) against
    ragged_dot without a mesh: output and gradients, with padding tokens (unrouted rows after the
    groups). On the mesh each device holds a slice of every expert's hidden units (tensor) and the
    down projections' partial sums are added."""
    cfg = dataclasses.replace(LAYER, moe_impl="dropless", activation=activation, moe_matmul="ragged_dot")
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(4, 8, cfg.d_model)), jnp.float32)
    mask = jnp.asarray(rng.random((4, 8)) > 0.25)
    out, grads = _layer_output_and_grads(_moe_layer(cfg), x, mask)
    layer = _moe_layer(dataclasses.replace(cfg, moe_matmul="megablox"))
    if mesh_axes is None:
        out_mb, grads_mb = _layer_output_and_grads(layer, x, mask)
    else:
        with activation_sharding(make_mesh(MeshConfig(**mesh_axes)), default_rules()):
            out_mb, grads_mb = _layer_output_and_grads(layer, x, mask)
    assert reference.relative_error(out_mb, out) < TOL_OP
    for name, g_mb, g in zip(("x", "router", "up", "down", "gate"), grads_mb, grads, strict=True):
        assert (g_mb is None) == (g is None), name
        if g is not None:
            assert reference.relative_error(g_mb, g) < TOL_OP, name

LAYOUT = dataclasses.replace(SMALL_MOE, num_layers=5, first_dense_layers=1, moe_every=2,
                             num_experts=4)


def test_layout_scanned_equals_unrolled_and_places_moe_layers():
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 16)), jnp.int32)
    params = _init_params(LAYOUT)
    graphdef_scan, _ = nnx.split(nnx.eval_shape(lambda: Transformer(LAYOUT, nnx.Rngs(0))))
    graphdef_loop, _ = nnx.split(nnx.eval_shape(
        lambda: Transformer(dataclasses.replace(LAYOUT, scan_layers=False), nnx.Rngs(0))))
    assert params["blocks"]["mlp"]["w_up_df"][...].shape[0] == 1  # first dense layer
    assert params["group_blocks"]["mlp"]["w_up_df"][...].shape[0] == 2  # layers 1 and 3
    assert params["moe_blocks"]["moe"]["w_up_edf"][...].shape[:2] == (2, 4)  # layers 2 and 4

    def run(graphdef, p):
        def loss(p):
            model = nnx.merge(graphdef, p)
            x, aux = model.hidden(tokens)
            logits = lm_logits(x, model.head_weight_vd())
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]) + aux["loss"], aux
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(p)

    (loss_scan, aux_scan), grads_scan = run(graphdef_scan, params)
    (loss_loop, aux_loop), grads_loop = run(graphdef_loop, params)
    assert aux_scan["expert_load"].shape == (2, 4)
    assert abs(float(loss_scan) - float(loss_loop)) <= TOL_MODEL * abs(float(loss_loop))
    for a, b in zip(jax.tree.leaves((aux_scan, grads_scan)), jax.tree.leaves((aux_loop, grads_loop)),
                    strict=True):
        assert reference.relative_error(a, b) < TOL_MODEL


@pytest.mark.parametrize("variant", [
    {}, {"activation": "gelu", "num_shared_experts": 0}, {"tie_embeddings": False},
])
def test_parameter_counts_total_and_active(variant):
    cfg = dataclasses.replace(LAYOUT, **variant)
    _, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    counts = param_counts(cfg)
    assert sum(x.size for x in jax.tree.leaves(params)) == counts["total"]
    unit = (3 if cfg.activation == "swiglu" else 2) * cfg.d_model * cfg.expert_mlp_dim
    unused = cfg.num_moe_layers * (cfg.num_experts - cfg.experts_per_token) * unit
    assert counts["active"] == counts["total"] - unused


def _preset(name: str, *overrides: str):
    cfg = build_config(load_yaml(CONFIG_DIR / name), list(overrides))
    validate(cfg, jax.device_count())
    return cfg


def test_moe_tiny_and_its_dense_twin_have_the_same_active_parameters():
    moe, dense = _preset("moe_tiny.yaml").model, _preset("dense_tiny.yaml").model
    assert (moe.num_experts, moe.experts_per_token) == (8, 2)
    difference = param_counts(moe)["active"] - param_counts(dense)["total"]
    assert difference == moe.num_layers * moe.d_model * moe.num_experts  # the routers only


@pytest.mark.slow  # end-to-end training (17 s); make test keeps the MoE equivalence tests
def test_moe_tiny_loss_falls_and_every_expert_gets_tokens(eight_devices, tmp_path):
    text = small_text(tmp_path / "text")
    cfg = _preset("moe_tiny.yaml", f"run.dir={tmp_path / 'run'}", f"data.source=text:{text}",
                  "train.steps=100", "train.log_every=1", "checkpoint.every=0")
    summary = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 100
    first, last = steps[0]["loss"], np.mean([r["loss"] for r in steps[-10:]])
    assert last < first - 3.0, (first, last)
    load = np.sum([r["expert_load"] for r in steps], axis=0)  # [MoE layers, experts]
    assert load.shape == (2, 8) and np.all(load > 0), load
    for key in ("moe_aux_loss", "moe_z_loss", "moe_dropped_frac"):
        assert all(math.isfinite(r[key]) for r in steps), key
    assert len(steps[-1]["moe_dropped_frac_per_layer"]) == 2
    assert (tmp_path / "run" / "expert_load.png").stat().st_size > 0
    assert summary["eval_loss"] < 2.5


@pytest.mark.parametrize("override, key", [
    ("model.num_experts=6", "model.num_experts"),  # 6 experts on an expert axis of 4
    ("model.experts_per_token=9", "model.experts_per_token"),  # k > 8 experts
    ("model.capacity_factor=0", "model.capacity_factor"),
])
def test_config_errors_exit_2_with_one_line(eight_devices, tmp_path, capsys, override, key):
    code = train_cli.main([str(ROOT / "configs/moe_tiny.yaml"), override,
                           f"run.dir={tmp_path / 'run'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}: "), lines
    assert not (tmp_path / "run").exists()
