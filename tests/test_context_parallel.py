"""Context parallelism: attention over a sequence split across devices (keys and values all-gathered)
equals exact attention, outputs and gradients; so does a whole model's training gradient; a long step
needs a fraction of one device's memory; the sequence length must split over the axis."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import ConfigError
from model.context_attention import context_attention
from sharding.constrain import activation_sharding, shards, under_activation_sharding
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules, logical_sharding
from tests import reference
from tests.helpers import SMALL, host_params, loss_and_grads, random_batch, with_packing
from train.config import build_config
from train.program import Program, memory_report
from train.validate import validate

TOL = 1e-5  # fp32 relative
B, T, N, H = 2, 32, 4, 8
BLOCK = 3  # 8 local queries per device at context=4: two whole blocks and a tail of 2
WINDOW = 5  # crosses the chunk boundaries
# (packed, window, traced): every mask the model gives attention, a window static or per layer
VARIANTS = [(packed, window, traced) for packed in (False, True)
            for window, traced in ((0, False), (WINDOW, False), (WINDOW, True))]


def segment_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Packed rows: documents of random lengths (1 to length / 2), crossing chunk boundaries."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        lengths = rng.integers(1, length // 2 + 1, length)
        rows.append(np.repeat(np.arange(1, length + 1), lengths)[:length])
    return np.stack(rows).astype(np.int32)


def exact_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, window):
    """Plain float32 attention over the whole [T, T] mask (the slow path context parallelism
    avoids), grouped heads by repetition."""
    n, k, h, t = q_btnh.shape[2], k_btkh.shape[2], q_btnh.shape[3], q_btnh.shape[1]
    k_btnh, v_btnh = (jnp.repeat(x, n // k, axis=2) for x in (k_btkh, v_btkh))
    idx = jnp.arange(t)
    mask_tt = (idx[None, :] <= idx[:, None]) & ((window <= 0) | (idx[:, None] - idx[None, :] < window))
    mask_btt = mask_tt[None]
    if segment_ids_bt is not None:
        mask_btt = mask_btt & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    logits = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_btnh, precision="highest") * h ** -0.5
    probs = jax.nn.softmax(jnp.where(mask_btt[:, None], logits, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs, v_btnh, precision="highest")


def outputs_and_grads(attention, q, k, v, cot, segs, window_arr):
    """{variant: (output, (dq, dk, dv))} of ``attention`` for every entry of VARIANTS."""
    out = {}
    for packed, window, traced in VARIANTS:
        def loss(q, k, v, packed=packed, window=window, traced=traced):
            o = attention(q, k, v, segs if packed else None, window_arr if traced else window)
            return jnp.sum(o * cot), o
        (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        out[(packed, window, traced)] = (o, grads)
    return out


def inputs(kv_heads: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k, v = (rng.normal(size=(B, T, kv_heads, H)).astype(np.float32) for _ in range(2))
    cot = rng.normal(size=(B, T, N, H)).astype(np.float32)
    return q, k, v, cot, segment_ids(B, T, seed)


def assert_all_close(actual: dict, expected: dict) -> None:
    for variant, (out, grads) in expected.items():
        assert reference.relative_error(actual[variant][0], out) < TOL, variant
        for got, want, name in zip(actual[variant][1], grads, "qkv", strict=True):
            assert reference.relative_error(got, want) < TOL, (variant, f"d{name}")


@functools.cache
def expected_of(kv_heads: int) -> dict:
    """Exact attention's outputs and gradients for ``inputs(kv_heads)``: computed once per kv
    head count and shared by the tests that compare against it (they only read it)."""
    q, k, v, cot, segs = inputs(kv_heads)
    return jax.device_get(jax.jit(functools.partial(outputs_and_grads, exact_attention))(
        q, k, v, cot, segs, jnp.int32(WINDOW)))


def test_exact_reference_matches_the_numpy_oracle():
    q, k, v, _, segs = inputs(2)
    exact = jax.jit(exact_attention, static_argnums=4)  # one program per case, not one per op
    for packed, window in ((False, 0), (True, WINDOW)):
        ids = segs if packed else None
        expected = reference.attention(q, k, v, ids, window)
        assert reference.relative_error(exact(q, k, v, ids, window), expected) < TOL


def test_context_attention_without_a_mesh_is_exact_attention():
    q, k, v, cot, segs = inputs(2)
    attention = functools.partial(context_attention, block=BLOCK)
    actual = jax.jit(functools.partial(outputs_and_grads, attention))(q, k, v, cot, segs, jnp.int32(WINDOW))
    assert_all_close(actual, expected_of(2))


@pytest.mark.parametrize("mesh_axes,kv_heads", [
    ({"data": 1, "context": 4}, 2),
    ({"data": 2, "context": 4}, 2),
    ({"data": 1, "context": 4, "tensor": 2}, 1),  # heads split, the one kv head not: repeated
])
def test_context_attention_equals_exact_attention(eight_devices, mesh_axes, kv_heads):
    devices = eight_devices[:int(np.prod(list(mesh_axes.values())))]
    mesh, rules = make_mesh(MeshConfig(**mesh_axes), devices), default_rules()
    q, k, v, cot, segs = inputs(kv_heads)
    sharded = [jax.device_put(x, logical_sharding(names, x.shape, mesh, rules)) for x, names in (
        (q, ("batch", "length", "heads", "head_dim")), (k, ("batch", "length", "kv_heads", "head_dim")),
        (v, ("batch", "length", "kv_heads", "head_dim")), (cot, ("batch", "length", "heads", "head_dim")),
        (segs, ("batch", "length")))]
    attention = functools.partial(context_attention, block=BLOCK)
    step = jax.jit(under_activation_sharding(functools.partial(outputs_and_grads, attention), mesh, rules))
    compiled = step.lower(*sharded, jnp.int32(WINDOW)).compile()
    actual = compiled(*sharded, jnp.int32(WINDOW))
    assert_all_close(actual, expected_of(kv_heads))
    assert "all-gather" in compiled.as_text()  # keys and values, gathered at the region's boundary
    out = actual[(False, 0, False)][0]
    assert out.sharding.shard_shape(out.shape)[1] == T // 4  # the output stays split by length


def test_shards_names_how_the_active_mesh_splits_a_dimension(eight_devices):
    mesh = make_mesh(MeshConfig(data=2, context=4))
    assert shards("length") == 1  # no mesh
    with activation_sharding(mesh, default_rules()):
        assert (shards("length"), shards("batch"), shards("heads")) == (4, 2, 1)
        assert (shards("length", 1024), shards("length", 1), shards("length", 6)) == (4, 1, 1)


def test_mesh_context_is_a_config_key():
    assert MeshConfig().context == 1
    assert build_config({}, ["mesh.context=4"]).mesh.context == 4


def test_seq_len_must_split_over_the_context_axis():
    cfg = build_config({}, ["mesh.data=2", "mesh.context=4", "train.seq_len=30",
                            "model.max_seq_len=32"])
    with pytest.raises(ConfigError, match=r"^train\.seq_len: seq_len=30 .* context-parallel size 4"):
        validate(cfg, 8)
    validate(build_config({}, ["mesh.data=2", "mesh.context=4", "train.seq_len=32",
                               "model.max_seq_len=32"]), 8)


# ----------------------------------------------------------------------------------------------
# The whole model: model/attention.py routes attention through context_attention whenever the
# active mesh splits the length.

CP_MODEL = dataclasses.replace(SMALL, max_seq_len=1024)
# (mesh, packed, window, pattern): pattern 2 alternates a local layer (its window traced inside the
# scanned stack) with a global one; pattern 0 makes every layer local (a window known when tracing)
MODEL_CASES = [
    ({"data": 1, "context": 4}, True, 64, 2),
    ({"data": 2, "context": 4}, False, 0, 0),
    pytest.param({"data": 2, "context": 4}, True, 64, 0, marks=pytest.mark.slow),
    pytest.param({"data": 1, "context": 4}, False, 64, 2, marks=pytest.mark.slow),
]


def packed_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``random_batch`` with packed documents: segment ids and positions restarting per document."""
    return with_packing(random_batch(batch_size, seq_len, vocab, seed),
                        segment_ids(batch_size, seq_len, seed))


@pytest.mark.parametrize("mesh_axes,packed,window,pattern", MODEL_CASES)
def test_train_step_under_context_parallelism_equals_one_device(eight_devices, mesh_axes, packed,
                                                                window, pattern):
    cfg = dataclasses.replace(CP_MODEL, sliding_window=window, sliding_window_pattern=pattern)
    batch = packed_batch(2, cfg.max_seq_len, cfg.vocab_size)
    if not packed:
        batch = {k: batch[k] for k in ("inputs", "targets", "weights")}
    params = host_params(cfg)
    loss_1, grads_1 = loss_and_grads(cfg, {"data": 1}, batch, devices=eight_devices[:1],
                                     params=params)
    devices = eight_devices[:int(np.prod(list(mesh_axes.values())))]
    loss_n, grads_n = loss_and_grads(cfg, mesh_axes, batch, devices=devices, params=params)
    assert abs(loss_n - loss_1) <= TOL * abs(loss_1)
    for a, b in zip(jax.tree.leaves(grads_n), jax.tree.leaves(grads_1), strict=True):
        assert reference.relative_error(a, b) < TOL


# A train step of bench.longctx's model at 8192 tokens: its XLA temporaries per device on context=8
# (78 MiB measured), and on one device with the auto kernel (blockwise at this length: 430 MiB)
# or the einsum kernel (7,761 MiB).
LONG_MODEL = ["model.vocab_size=384", "model.d_model=128", "model.num_layers=2", "model.num_heads=4",
              "model.num_kv_heads=4", "model.mlp_dim=512", "train.batch_size=1", "data.tokenizer=byte",
              "data.streams=1", "model.max_seq_len=8192", "train.seq_len=8192"]
CONTEXT_BOUND = 128 * 2 ** 20


def step_temporaries(overrides: list[str], devices: list) -> int:
    """XLA's temporary bytes per device of the compiled train step of ``build_config({}, overrides)``
    on ``devices`` (nothing runs)."""
    cfg = build_config({}, overrides)
    validate(cfg, len(devices))
    program = Program(cfg, mesh=make_mesh(cfg.mesh, devices))
    return memory_report(program.lower_train_step().compile()).get("temporaries", 0)


@pytest.mark.parametrize("unsharded_impl", ["einsum", pytest.param("auto", marks=pytest.mark.slow)])
def test_long_step_on_context_8_needs_a_fraction_of_the_memory(eight_devices, unsharded_impl):
    sharded = step_temporaries(LONG_MODEL + ["mesh.data=1", "mesh.context=8"], eight_devices)
    assert 0 < sharded < CONTEXT_BOUND
    unsharded = step_temporaries(LONG_MODEL + ["mesh.data=1", f"model.attention_impl={unsharded_impl}"],
                                 eight_devices[:1])
    assert unsharded > 4 * sharded
