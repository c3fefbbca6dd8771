"""Grouped matmuls of the dropless MoE path: the megablox Pallas kernel (interpreted on this CPU
host) and the tiled one against ``ragged_dot`` and a per-row oracle, and ``moe_matmul=auto``
choosing the kernel when the program is lowered for a TPU topology (libtpu's compile-only
devices)."""

from __future__ import annotations

import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import topologies

from cli.compile import prepare_environment
from model.config import ModelConfig
from model.grouped_matmul import grouped_matmul, resolve_matmul
from model.moe import MoE
from sharding.constrain import activation_sharding
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules
from tests import reference

TOL_OP = 1e-5  # fp32, simple ops


def _oracle(x_ad, w_edf, group_sizes_e, probe_af):
    """float64, one row at a time: (y, dL/dx, dL/dw) of L = sum(y * probe), where row a of y is
    x[a] @ w[its group] and rows past all groups are zero."""
    x, w, probe = (np.asarray(a, np.float64) for a in (x_ad, w_edf, probe_af))
    y, dx, dw = np.zeros(probe.shape), np.zeros(x.shape), np.zeros(w.shape)
    group_a = np.repeat(np.arange(len(group_sizes_e)), group_sizes_e)
    for a, e in enumerate(group_a):
        y[a] = x[a] @ w[e]
        dx[a] = w[e] @ probe[a]
        dw[e] += np.outer(x[a], probe[a])
    return y, dx, dw


@pytest.mark.parametrize("rows, group_sizes", [
    (20, [5, 0, 9, 3]),  # an empty group, 3 rows past all groups, one row tile
    (600, [0, 300, 250, 0, 40]),  # two row tiles of 512 with a group across their boundary
])
def test_megablox_and_tiled_gmm_equal_ragged_dot_and_the_per_row_oracle(rows, group_sizes):
    rng = np.random.default_rng(0)
    d, f = 8, 12
    x_ad = jnp.asarray(rng.normal(size=(rows, d)), jnp.float32)
    w_edf = jnp.asarray(rng.normal(size=(len(group_sizes), d, f)), jnp.float32)
    group_sizes_e = jnp.asarray(group_sizes, jnp.int32)
    probe_af = jnp.asarray(rng.normal(size=(rows, f)), jnp.float32)
    expected = _oracle(x_ad, w_edf, group_sizes, probe_af)

    def run(impl):
        def loss(x_ad, w_edf):
            y_af = grouped_matmul(x_ad, w_edf, group_sizes_e, impl)
            return jnp.sum(y_af * probe_af), y_af

        (_, y_af), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            x_ad, w_edf)
        return y_af, *grads

    ragged = run("ragged_dot")
    for impl in ("megablox", "tiled"):  # tiled: 8 rows a tile, then 32 (row_tile)
        for name, r, m, e in zip(("y", "dx", "dw"), ragged, run(impl), expected, strict=True):
            assert np.all(np.isfinite(m)), name  # the kernel leaves rows past the groups unwritten
            assert reference.relative_error(m, e) < TOL_OP, (impl, name)
            assert reference.relative_error(m, r) < TOL_OP, (impl, name)


@pytest.fixture(scope="module")
def tpu_devices() -> list:
    """The compile-only devices of a v5e:2x2 topology (libtpu on this host, no TPU attached)."""
    with mock.patch.dict(os.environ):
        prepare_environment()
        return list(topologies.get_topology_desc("v5e:2x2", "tpu").devices)


@pytest.mark.parametrize("moe_matmul, kernel", [("auto", True), ("ragged_dot", False)])
def test_auto_lowers_the_megablox_kernel_for_a_tpu_target(tpu_devices, moe_matmul, kernel):
    """The dropless layer's forward and backward lowered (not run) for TPU with a tensor-sharded
    expert_mlp: ``auto`` puts the Pallas kernel's Mosaic custom call in the program."""
    cfg = ModelConfig(vocab_size=16, d_model=128, num_layers=1, num_heads=2, num_kv_heads=2,
                      mlp_dim=128, max_seq_len=8, num_experts=4, experts_per_token=2,
                      moe_impl="dropless", moe_matmul=moe_matmul)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, nnx.Rngs(0))))

    def loss(state, x_btd):
        y_btd, _ = nnx.merge(graphdef, state)(x_btd)
        return jnp.sum(y_btd)

    assert resolve_matmul("auto") == "tiled"  # this CPU host
    with activation_sharding(make_mesh(MeshConfig(data=2, tensor=2), tpu_devices), default_rules()):
        assert resolve_matmul("auto") == "megablox"
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
            state, jax.ShapeDtypeStruct((4, 8, cfg.d_model), jnp.float32)).as_text()
    assert ("tpu_custom_call" in text) == kernel
    assert ("ragged_dot" in text) != kernel

