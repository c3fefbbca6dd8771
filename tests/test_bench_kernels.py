"""The fast paths of issue 8 against the existing ones: attention_impl=xla and blockwise against the
naive reference attention, whole models with them (and with fused_projections) against the
default path, and the chunked cross-entropy (loss_chunk) against the full-logits loss, values and
gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.attention import attention_probs, causal_attention, causal_mask, dot_product_attention
from model.attention_kernels import blockwise_causal_attention
from model.config import ModelConfig
from model.lora import LoRASpec, adapters, add_lora, set_deterministic
from model.loss import chunked_nll_sum
from model.transformer import Transformer
from tests import reference
from tests.helpers import SMALL, loss_and_grads, packed_segments, qkv, random_batch


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
@pytest.mark.parametrize("packed", [False, True])
def test_attention_impls_match_reference(impl: str, packed: bool) -> None:
    b, t = 2, 11  # 11 = blocks of 4, 4 and 3 for blockwise
    q, k, v = qkv(b, t, 4, 2, 8)
    segments = packed_segments(b, t) if packed else None
    seg = None if segments is None else jnp.asarray(segments)
    out = causal_attention(q, k, v, seg, 0, False, impl=impl, block=4)
    np.testing.assert_allclose(out, reference.attention(q, k, v, segments), atol=1e-5, rtol=1e-5)


def test_blockwise_gradients_match_einsum() -> None:
    block = 5  # blocks of 5, 5 and 2 rows
    b, t = 2, 12
    q, k, v = qkv(b, t, 4, 2, 8, seed=1)
    segments = jnp.asarray(packed_segments(b, t))
    mask = causal_mask(segments, b, t)
    cotangent = jax.random.normal(jax.random.key(2), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)

    expected = jax.jit(jax.grad(loss(lambda q, k, v: dot_product_attention(q, k, v, mask)),
                                (0, 1, 2)))(q, k, v)
    actual = jax.jit(jax.grad(loss(lambda q, k, v: blockwise_causal_attention(q, k, v, segments, 0, block)),
                              (0, 1, 2)))(q, k, v)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5)


def test_attention_weights_exist_whatever_the_impl() -> None:
    """The weights come from the einsum path, which every impl can sow."""
    q, k, v = qkv(1, 6, 4, 2, 8)
    mask = causal_mask(None, 1, 6)
    probs = attention_probs(q, k, mask)  # the weights come from the einsum path whatever the impl
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("chunk", [3, 8])
def test_chunked_loss_matches_full_logits(chunk: int) -> None:
    """3 pads the 8 positions to 9 with a weight-0 one; 8 is one chunk."""
    b, t, d, v = 2, 8, 16, 24
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], (b, t, d))
    w_vd = 0.3 * jax.random.normal(keys[1], (v, d))
    targets = jax.random.randint(keys[2], (b, t), 0, v)
    weights = jnp.asarray(random_batch(b, t, v)["weights"])

    def full(x, w_vd):
        logits = jnp.einsum("btd,vd->btv", x, w_vd)
        target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target) * weights)

    def chunked(x, w_vd):
        return chunked_nll_sum(x, w_vd, targets, weights, chunk)

    np.testing.assert_allclose(jax.jit(chunked)(x, w_vd), full(x, w_vd), rtol=1e-5)
    actual, expected = (jax.jit(jax.grad(f, (0, 1)))(x, w_vd) for f in (chunked, full))
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_changes, overrides", [
    ({}, {"attention_impl": "blockwise", "attention_block": 5, "loss_chunk": 5}),
    ({"tie_embeddings": False}, {"attention_impl": "xla", "loss_chunk": 4}),
    ({}, {"fused_projections": True}),
    pytest.param({"activation": "gelu", "position": "learned"}, {"fused_projections": True},
                 marks=pytest.mark.slow),
], ids=["blockwise_chunked_loss", "xla_chunked_loss_untied", "fused_swiglu_gqa", "fused_gelu"])
def test_model_options_match_default_path(model_changes: dict, overrides: dict,
                                          eight_devices: list) -> None:
    """Loss and gradients of a whole model on a data x tensor mesh equal the default path's."""
    base = dataclasses.replace(SMALL, **model_changes)
    batch = random_batch(4, 12, SMALL.vocab_size)
    mesh = {"data": 2, "tensor": 2}
    devices = eight_devices[:4]
    loss, grads = loss_and_grads(base, mesh, batch, devices=devices)
    fast_loss, fast_grads = loss_and_grads(dataclasses.replace(base, **overrides), mesh, batch,
                                           devices=devices)
    np.testing.assert_allclose(fast_loss, loss, rtol=1e-5)
    for a, e in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-4)


def test_config_rejects_bad_fast_path_options() -> None:
    bad = ModelConfig(attention_block=0, loss_chunk=-1)
    assert {key for key, _ in bad.problems()} >= {"attention_block", "loss_chunk"}
    assert ModelConfig(attention_impl="blockwise", loss_chunk=64).problems() == []


@pytest.mark.slow
def test_fused_projections_keep_lora_adapters() -> None:
    """With LoRA adapters on q, k, v, gate and up (non-zero updates), the fused projections give the
    unfused model's logits: each adapter still adds to its own slice of the fused matmul."""
    cfg = dataclasses.replace(SMALL, scan_layers=False)
    model = set_deterministic(add_lora(Transformer(cfg, nnx.Rngs(0)), LoRASpec(rank=2), nnx.Rngs(1)),
                              True)
    for i, (_, _, adapter) in enumerate(adapters(model)):
        adapter.b[...] = 0.1 * jax.random.normal(jax.random.key(i), adapter.b.shape)
    graphdef, state = nnx.split(model)
    fused = set_deterministic(add_lora(Transformer(dataclasses.replace(cfg, fused_projections=True),
                                                   nnx.Rngs(0)), LoRASpec(rank=2), nnx.Rngs(1)), True)
    fused_graphdef, _ = nnx.split(fused)
    tokens = jnp.asarray(random_batch(2, 8, SMALL.vocab_size)["inputs"])
    expected, actual = (jax.jit(lambda s, t, g=g: nnx.merge(g, s)(t))(state, tokens)
                        for g in (graphdef, fused_graphdef))
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)
