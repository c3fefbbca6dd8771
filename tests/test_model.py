"""Model kernels against the NumPy oracles, and layer-stack equivalences."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.attention import causal_mask, dot_product_attention
from model.config import ModelConfig
from model.flops import param_counts
from model.layers import RMSNorm, apply_rope
from model.loss import nll_sums
from model.transformer import Transformer
from tests import reference

TOL_OP = 1e-5  # fp32, simple ops
TOL_MODEL = 1e-4  # fp32, whole models

SMALL = ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
                    mlp_dim=48, max_seq_len=16)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_attention_matches_naive_reference(kv_heads):
    rng = np.random.default_rng(kv_heads)
    q = rng.normal(size=(2, 7, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
    v = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
    out = dot_product_attention(q, k, v, causal_mask(None, 2, 7))
    assert reference.relative_error(out, reference.attention(q, k, v)) < TOL_OP


def test_attention_never_crosses_segments():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 6, 4, 8)).astype(np.float32) for _ in range(3))
    segments = np.array([[1, 1, 1, 2, 2, 2], [1, 2, 2, 2, 3, 3]], np.int32)
    out = dot_product_attention(q, k, v, causal_mask(jnp.asarray(segments), 2, 6))
    assert reference.relative_error(out, reference.attention(q, k, v, segments)) < TOL_OP


def test_rope_matches_naive_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 3, 0, 11, 100]], np.int32)
    out = apply_rope(jnp.asarray(x), jnp.asarray(positions), 10000.0)
    assert reference.relative_error(out, reference.rope(x, positions, 10000.0)) < TOL_OP


def test_rope_keeps_relative_positions():
    """q.k after RoPE depends only on the distance between positions."""
    rng = np.random.default_rng(2)
    q, k = (rng.normal(size=(1, 1, 1, 16)).astype(np.float32) for _ in range(2))
    def score(pq, pk):
        rq = apply_rope(q, jnp.array([[pq]]), 10000.0)
        rk = apply_rope(k, jnp.array([[pk]]), 10000.0)
        return float(jnp.sum(rq * rk))
    assert abs(score(5, 2) - score(13, 10)) < 1e-4 * abs(score(5, 2))


def test_rms_norm_matches_reference():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 32)).astype(np.float32)
    norm = RMSNorm(32, SMALL, nnx.Rngs(0))
    # a device array of the variable's shape and dtype replaces it whole: no scatter to compile
    norm.scale[...] = jnp.asarray(rng.normal(size=(32,)).astype(np.float32))
    expected = reference.rms_norm(x, np.asarray(norm.scale[...]), SMALL.norm_eps)
    assert reference.relative_error(norm(jnp.asarray(x)), expected) < TOL_OP


def _logits_and_grads(cfg, params, graphdef, tokens):
    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads


# slow (18 s each); make test keeps test_moe.py's scanned-equals-unrolled layout test
@pytest.mark.parametrize("remat", [pytest.param("none", marks=pytest.mark.slow),
                                   pytest.param("full", marks=pytest.mark.slow)])
def test_scanned_layers_equal_unrolled(remat):
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 16)), jnp.int32)
    scanned_cfg = dataclasses.replace(SMALL, scan_layers=True, remat=remat)
    graphdef_scan, params = nnx.split(Transformer(scanned_cfg, nnx.Rngs(0)))
    graphdef_loop, _ = nnx.split(Transformer(dataclasses.replace(SMALL, scan_layers=False),
                                             nnx.Rngs(0)))
    logits_scan, grads_scan = _logits_and_grads(scanned_cfg, params, graphdef_scan, tokens)
    logits_loop, grads_loop = _logits_and_grads(SMALL, params, graphdef_loop, tokens)
    assert reference.relative_error(logits_scan, logits_loop) < TOL_MODEL
    for a, b in zip(jax.tree.leaves(grads_scan), jax.tree.leaves(grads_loop), strict=True):
        assert reference.relative_error(a, b) < TOL_MODEL


def test_causal_model_ignores_future_tokens():
    model = Transformer(SMALL, nnx.Rngs(0))
    tokens = np.random.default_rng(5).integers(0, 64, (1, 12)).astype(np.int32)
    changed = tokens.copy()
    changed[0, 8:] = (changed[0, 8:] + 1) % 64
    a, b = model(jnp.asarray(tokens)), model(jnp.asarray(changed))
    assert reference.relative_error(a[:, :8], b[:, :8]) < TOL_OP
    assert not np.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("variant", [
    {"position": "learned"}, {"tie_embeddings": False}, {"activation": "gelu"},
    {"num_kv_heads": 1}, {"num_kv_heads": 4}, {"head_dim": 6, "position": "learned"},
])
def test_parameter_count_matches_initialised_state(variant):
    cfg = dataclasses.replace(SMALL, **variant)
    model = Transformer(cfg, nnx.Rngs(0))
    _, params = nnx.split(model)
    assert sum(x.size for x in jax.tree.leaves(params)) == param_counts(cfg)["total"]
    assert model(jnp.zeros((2, 16), jnp.int32)).shape == (2, 16, 64)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = dataclasses.replace(SMALL, dtype="bfloat16")
    model = Transformer(cfg, nnx.Rngs(0))
    _, params = nnx.split(model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits = model(jnp.zeros((2, 16), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    full = Transformer(SMALL, nnx.Rngs(0))(jnp.zeros((2, 16), jnp.int32))
    assert reference.relative_error(logits, full) < 5e-2  # bf16 has an 8-bit mantissa


def _reference_logits_and_loss(x_btd, w_vd, targets_bt, weights_bt) -> tuple[np.ndarray, float]:
    """Logits of the bf16 features and head weight with every product and sum in float64, and the
    weighted cross-entropy sum over them."""
    logits = np.einsum("btd,vd->btv", np.asarray(x_btd, np.float64), np.asarray(w_vd, np.float64))
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    nll = lse - np.take_along_axis(logits, targets_bt[..., None], -1)[..., 0]
    return logits, float(np.sum(nll * weights_bt))


@pytest.mark.parametrize("tied", [True, False])
def test_bfloat16_logits_and_loss_are_float32_accumulated(tied):
    """With bf16 compute, the head's logits (and the loss, whole or chunked) are the float32 sums
    of the bf16 features times the bf16 head weight, not rounded to bf16."""
    cfg = dataclasses.replace(SMALL, dtype="bfloat16", tie_embeddings=tied, init_std=0.5)
    model = Transformer(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 64, (2, 16)).astype(np.int32)
    batch = {"inputs": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, 1)),
             "weights": jnp.asarray((rng.random((2, 16)) > 0.2).astype(np.float32))}
    x_btd, _ = model.hidden(batch["inputs"])
    w_vd = model.head_weight_vd()
    assert x_btd.dtype == w_vd.dtype == jnp.bfloat16
    want_logits, want_loss = _reference_logits_and_loss(x_btd, w_vd, np.asarray(batch["targets"]),
                                                        np.asarray(batch["weights"]))
    logits = np.asarray(model(batch["inputs"]))
    assert logits.dtype == np.float32
    assert reference.relative_error(logits, want_logits) < TOL_OP
    rounded = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(logits != rounded) > 0.5  # most logits are not bf16 values
    for chunk in (0, 5):  # the whole [B, T, V] head and the chunked loss
        model.cfg = dataclasses.replace(cfg, loss_chunk=chunk)
        loss_sum, _, _ = nll_sums(model, batch)
        assert abs(float(loss_sum) - want_loss) < TOL_OP * abs(want_loss), chunk


def test_every_parameter_has_logical_axis_names():
    _, params = nnx.split(nnx.eval_shape(lambda: Transformer(
        dataclasses.replace(SMALL, tie_embeddings=False, position="learned"), nnx.Rngs(0))))
    for path, var in nnx.to_flat_state(params):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), path


def test_scanned_compile_size_is_flat_in_depth():
    """The scanned stack lowers to the same program for 2 or 8 layers; the unrolled one grows."""
    def hlo_size(num_layers, scan):
        cfg = dataclasses.replace(SMALL, num_layers=num_layers, scan_layers=scan)
        graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
        fn = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
        return len(fn.lower(params, jax.ShapeDtypeStruct((2, 16), jnp.int32)).as_text())
    assert hlo_size(8, scan=True) < 1.05 * hlo_size(2, scan=True)
    assert hlo_size(8, scan=False) > 2 * hlo_size(2, scan=False)
