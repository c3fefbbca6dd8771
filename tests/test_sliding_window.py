"""Sliding-window (local) attention: every kernel against the naive reference, the per-layer
pattern, and cached decoding (a rolling cache when every layer is local) against the full forward
pass with the window mask."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.attention import Attention, causal_attention
from model.config import ModelConfig
from model.flops import attention_flops_per_token, causal_train_flops_per_token, train_flops_per_token
from model.transformer import Transformer, cache_shapes
from tests import reference
from tests.helpers import SMALL, host_params, packed_segments, qkv
from tests.test_generate import assert_decoding_equals_the_full_pass

TOL = 1e-5  # fp32, simple ops
TOL_MODEL = 1e-4  # fp32, whole models






@pytest.mark.parametrize("impl", ["einsum", "xla", "blockwise"])
@pytest.mark.parametrize("packed", [False, True])
def test_every_kernel_keeps_to_the_window(impl: str, packed: bool) -> None:
    """Static (a stack of local layers) and traced (a stack mixing local and global layers) windows
    give the reference's windowed attention; a global layer of the mixed stack sees everything."""
    b, t, window = 2, 13, 4
    q, k, v = qkv(b, t, 4, 2, 8)
    segments = packed_segments(b, t) if packed else None
    seg = None if segments is None else jnp.asarray(segments)
    local_ref = reference.attention(q, k, v, segments, window)
    global_ref = reference.attention(q, k, v, segments)

    def run(local):
        return causal_attention(q, k, v, seg, window, local, impl=impl, block=5)

    np.testing.assert_allclose(jax.jit(lambda: run(True))(), local_ref, rtol=TOL, atol=TOL)
    mixed = jax.jit(run)
    np.testing.assert_allclose(mixed(jnp.bool_(True)), local_ref, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(mixed(jnp.bool_(False)), global_ref, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("traced", [False, True])
def test_windowed_gradients_match_the_einsum_path(traced: bool) -> None:
    """blockwise's own backward pass, with the window fixed or a traced per-layer value."""
    b, t, window = 2, 12, 3
    q, k, v = qkv(b, t, 4, 2, 8, seed=1)
    seg = jnp.asarray(packed_segments(b, t))
    cotangent = jax.random.normal(jax.random.key(2), q.shape)

    def grads(impl):
        def loss(q, k, v, local):
            out = causal_attention(q, k, v, seg, window, local if traced else True, impl=impl, block=5)
            return jnp.sum(out * cotangent)
        return jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v, jnp.bool_(True))

    for actual, expected in zip(grads("blockwise"), grads("einsum"), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=TOL, atol=TOL)


def test_the_pattern_makes_every_nth_layer_global() -> None:
    cfg = ModelConfig(num_layers=12, sliding_window=4, sliding_window_pattern=6)
    assert [d for d in range(12) if not cfg.is_local_layer(d)] == [5, 11]
    assert all(ModelConfig(num_layers=3, sliding_window=4).is_local_layer(d) for d in range(3))
    assert not any(ModelConfig(num_layers=3).is_local_layer(d) for d in range(3))
    assert dict(ModelConfig(sliding_window=-1).problems())["sliding_window"].startswith("must be >= 0")


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_local_layers_follow_the_pattern_through_the_stacks(moe: bool) -> None:
    """The sown attention weights of each layer: zero outside the window exactly on local layers
    (depth d is global when (d + 1) % pattern == 0), across the dense, group and MoE stacks."""
    t, window = 10, 3
    cfg = dataclasses.replace(SMALL, num_layers=5, sliding_window=window, sliding_window_pattern=2)
    if moe:
        cfg = dataclasses.replace(cfg, num_experts=4, experts_per_token=2, first_dense_layers=1,
                                  moe_every=2, moe_impl="dropless")
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))  # parameters drawn in NumPy
    nnx.update(model, jax.tree.map(jnp.asarray, host_params(cfg)))
    model.set_attributes(Attention, sow_intermediates=True)
    tokens = np.arange(t, dtype=np.int32)[None] % cfg.vocab_size
    _, sown = nnx.jit(lambda model, tokens: nnx.capture(model, nnx.Intermediate)(tokens))(
        model, tokens)
    (probs_lbnts,) = [np.asarray(variable.get_value()[0]) for path, variable in nnx.to_flat_state(sown)
                      if path[-1] == "attention_probs"]  # sown values are tuples of one array
    assert probs_lbnts.shape == (cfg.num_layers, 1, cfg.num_heads, t, t)
    idx = np.arange(t)
    outside_tt = idx[:, None] - idx[None, :] >= window
    for depth in range(cfg.num_layers):
        beyond = np.abs(probs_lbnts[depth][..., outside_tt]).max()
        assert (beyond == 0) == cfg.is_local_layer(depth), depth


WINDOWED = dataclasses.replace(SMALL, max_seq_len=64, init_std=0.3, tie_embeddings=False,
                               sliding_window=6)
# Rows shorter and longer than the window; the longest prompt's bucket (16) exceeds it, so the
# prefill writes each row's own last 6 positions into the rolling cache.
PROMPTS = [[5, 9, 2, 33, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [42], [8, 8, 8, 8, 8, 8, 8, 8, 8]]


@pytest.mark.parametrize("pattern", [0, 2], ids=["all-local-rolling", "mixed"])
def test_cached_decoding_with_a_window_equals_the_full_forward_pass(eight_devices, pattern: int):
    """Greedy decoding over the cache, well past the window, gives the logits of the full forward
    pass with the window mask at every step; with every layer local the cache holds only the
    window's slots (decoding memory bounded by the window)."""
    cfg = dataclasses.replace(WINDOWED, sliding_window_pattern=pattern)
    slots = cache_shapes(cfg, 4, 32)["blocks"][0].shape[2]
    assert slots == (cfg.sliding_window if pattern == 0 else 32)
    assert_decoding_equals_the_full_pass(cfg, {"data": -1, "tensor": 2}, PROMPTS, 14)


def test_causal_flops_count_the_keys_each_query_sees() -> None:
    """model/flops.py's causal count against counting each query's visible keys one by one; the
    full count (every query over all T keys, as training logs MFU) is what it replaces."""
    cfg = ModelConfig(num_layers=3, sliding_window=5, sliding_window_pattern=3, d_model=64, num_heads=4)
    t = 12
    keys = sum(min(q + 1, cfg.sliding_window) if cfg.is_local_layer(d) else q + 1
               for d in range(cfg.num_layers) for q in range(t)) / t
    attention = 3 * 4 * keys * cfg.num_heads * cfg.resolved_head_dim
    matmuls = train_flops_per_token(cfg, t) - attention_flops_per_token(cfg, t)
    assert causal_train_flops_per_token(cfg, t) == pytest.approx(matmuls + attention, rel=1e-12)
