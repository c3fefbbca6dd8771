"""Splash attention (the Pallas TPU kernel, run here in interpret mode) equals exact attention,
outputs and gradients, for causal, packed, grouped-query (K = 1, 2, N) and sliding-window masks; it
gives the unsharded result under data, FSDP, tensor and context parallelism; its fast block map
equals the library's; sequence lengths it cannot tile are refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from core.errors import ConfigError
from model.splash import make_kernel, splash_attention, splash_problems
from sharding.constrain import activation_sharding
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules
from tests import reference
from tests.helpers import SMALL, host_params, loss_and_grads, random_batch, with_packing
from train.config import build_config
from train.validate import validate

TOL = 1e-5  # fp32, relative to the largest entry (reference.relative_error)
B, T, N, H = 2, 384, 4, 64  # T = 3 blocks of 128: whole, partial and skipped key blocks


def segment_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Packed rows: documents of random lengths (1 to length / 3) that cross block boundaries."""
    rng = np.random.default_rng(seed)
    rows = [np.repeat(np.arange(1, length + 1), rng.integers(1, length // 3 + 1, length))[:length]
            for _ in range(batch)]
    return np.stack(rows).astype(np.int32)


def inputs(kv_heads: int, length: int = T, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, length, N, H)).astype(np.float32)
    k, v = (rng.normal(size=(B, length, kv_heads, H)).astype(np.float32) for _ in range(2))
    cot = rng.normal(size=(B, length, N, H)).astype(np.float32)
    return q, k, v, cot, segment_ids(B, length, seed)


def exact_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, window):
    """Plain float32 attention over the whole [T, T] mask, grouped heads by repetition."""
    n, k, t, h = q_btnh.shape[2], k_btkh.shape[2], q_btnh.shape[1], q_btnh.shape[3]
    k_btnh, v_btnh = (jnp.repeat(x, n // k, axis=2) for x in (k_btkh, v_btkh))
    idx = jnp.arange(t)
    back_tt = idx[:, None] - idx[None, :]  # how far key s lies behind query t
    mask_btt = ((back_tt >= 0) & ((window == 0) | (back_tt < window)))[None]
    if segment_ids_bt is not None:
        mask_btt = mask_btt & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    logits = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_btnh, precision="highest") * h ** -0.5
    probs = jax.nn.softmax(jnp.where(mask_btt[:, None], logits, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs, v_btnh, precision="highest")


def output_and_grads(attention, q, k, v, cot, segs, window):
    """(output, (dq, dk, dv)) of sum(attention(...) * cot), jitted."""
    def loss(q, k, v):
        o = attention(q, k, v, segs, window)
        return jnp.sum(o * cot), o
    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, grads


def assert_close(actual, expected, tol=TOL) -> None:
    (out, grads), (want_out, want_grads) = actual, expected
    assert reference.relative_error(out, want_out) < tol, "output"
    for got, want, name in zip(grads, want_grads, "qkv", strict=True):
        assert reference.relative_error(got, want) < tol, f"d{name}"


def test_exact_reference_matches_the_numpy_oracle():
    q, k, v, _, segs = inputs(1, length=128)
    exact = jax.jit(exact_attention, static_argnums=4)  # one program per case, not one per op
    for ids, window in ((None, 0), (segs, 0), (segs, 20)):
        expected = reference.attention(q[:1, :, :2], k[:1], v[:1], None if ids is None else ids[:1], window)
        got = exact(q[:1, :, :2], k[:1], v[:1], None if ids is None else ids[:1], window)
        assert reference.relative_error(got, expected) < TOL


# (kv heads, packed, window): MHA, GQA and MQA; a window inside one block, one over a block edge
CASES = [(N, False, 0), (2, True, 0), (1, True, 0), (2, False, 100), (1, True, 100), (N, True, 129)]


@pytest.mark.parametrize("kv_heads,packed,window", CASES)
def test_splash_equals_exact_attention(kv_heads, packed, window):
    q, k, v, cot, segs = inputs(kv_heads)
    ids = segs if packed else None
    assert_close(output_and_grads(splash_attention, q, k, v, cot, ids, window),
                 output_and_grads(exact_attention, q, k, v, cot, ids, window))


@pytest.fixture(scope="module")
def unsharded_splash() -> tuple:
    """The unsharded kernel's output and gradients for the sharded cases' inputs: the same for every
    mesh, so computed once (the tests only read it)."""
    q, k, v, cot, segs = inputs(2, length=512)
    return jax.device_get(output_and_grads(splash_attention, q, k, v, cot, segs, 100))


# data/FSDP/tensor (heads and kv heads split alike); tensor=4 over 2 kv heads (the kv heads repeated
# so each device holds its query heads' groups); context=2 and 4 (queries split, keys gathered)
MESHES = [MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(data=2, tensor=4),
          MeshConfig(data=2, context=2, tensor=2), MeshConfig(data=1, context=4, tensor=2)]


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=lambda c: f"d{c.data}f{c.fsdp}c{c.context}t{c.tensor}")
def test_sharded_splash_equals_unsharded(eight_devices, mesh_cfg, unsharded_splash):
    q, k, v, cot, segs = inputs(2, length=512)
    mesh = make_mesh(mesh_cfg)

    def sharded(*args):
        with activation_sharding(mesh, default_rules()):
            return splash_attention(*args)

    assert_close(output_and_grads(sharded, q, k, v, cot, segs, 100), unsharded_splash)


@pytest.mark.parametrize("window", [0, 1, 100, 128, 129, 2000])
def test_fast_block_map_equals_the_librarys(window):
    length, block = 1024, 128
    sizes = splash_lib.BlockSizes(block, block, block, block, block, block, block, block)
    for q_shards in (1, 4):
        mask = (mask_lib.LocalMask((length, length), (window - 1, 0), 0) if window
                else mask_lib.CausalMask((length, length)))
        theirs = splash_lib.make_splash_mha(mask_lib.MultiHeadMask((mask,)), block_sizes=sizes,
                                            head_shards=1, q_seq_shards=q_shards)
        ours = make_kernel(length, window, block, q_shards)
        for mine, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_array_equal(mine, want)


def test_lengths_the_kernel_cannot_tile_are_refused():
    assert splash_problems(384) == [] and splash_problems(131072) == []
    assert "multiple of 128" in splash_problems(200)[0]
    q, k, v, _, _ = inputs(2, length=200)
    with pytest.raises(ValueError, match="multiple of 128"):
        splash_attention(q, k, v, None, 0)


def test_a_model_trains_with_splash_as_with_einsum(eight_devices):
    """A whole train step with attention_impl=splash (local and global layers alternating, so the
    kernel runs under a lax.cond over the two windows; packed rows; split over data, context and
    tensor) gives the loss and gradients of the einsum path on one device."""
    cfg = dataclasses.replace(SMALL, max_seq_len=256, num_layers=2, sliding_window=48,
                              sliding_window_pattern=2)
    batch = with_packing(random_batch(2, 256, cfg.vocab_size), segment_ids(2, 256))
    params = host_params(cfg)
    loss_e, grads_e = loss_and_grads(dataclasses.replace(cfg, attention_impl="einsum"), {"data": 1},
                                     batch, devices=eight_devices[:1], params=params)
    loss_s, grads_s = loss_and_grads(dataclasses.replace(cfg, attention_impl="splash"),
                                     {"data": 2, "context": 2, "tensor": 2}, batch, params=params)
    assert abs(loss_s - loss_e) <= 1e-4 * abs(loss_e)  # fp32, whole models
    for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_e), strict=True):
        assert reference.relative_error(a, b) < 1e-4


def test_a_training_length_splash_cannot_tile_is_refused_before_compiling():
    base = ["model.attention_impl=splash", "model.max_seq_len=512"]
    with pytest.raises(ConfigError, match=r"^model\.attention_impl: splash cannot take "
                                          r"train\.seq_len=384 split 2 ways: .*multiple of 128"):
        validate(build_config({}, base + ["train.seq_len=384", "mesh.data=4", "mesh.context=2"]), 8)
    validate(build_config({}, base + ["train.seq_len=512", "mesh.data=4", "mesh.context=2"]), 8)
