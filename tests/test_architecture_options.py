"""The architecture options of imported families (Qwen2/3, Gemma 2/3, Llama 3.x): RoPE scaling
against transformers' own ROPE_INIT_FUNCTIONS, soft-capped attention in every kernel that takes it
(einsum, blockwise with its backward pass, context-parallel, splash) against the NumPy oracle, the
attention layer with biases, q/k norms and query_pre_attn_scalar against a NumPy computation, GeGLU,
the plus-one norm, the embedding scale and the capped LM head, the config checks, and cached
decoding against the full forward pass with the options on. Whole-model parity with transformers'
Gemma2/Gemma3/Qwen2/Qwen3 models is tests/test_convert.py's."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.attention import Attention, Span, causal_attention, resolve_impl
from model.config import ModelConfig
from model.context_attention import context_attention
from model.flops import param_counts
from model.layers import MLP, Embed, RMSNorm, Rope, apply_rope
from model.loss import chunked_nll_sum, lm_logits, token_nll
from model.splash import splash_attention
from model.transformer import Transformer
from sharding.constrain import under_activation_sharding
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules, logical_sharding
from tests import reference
from tests.helpers import SMALL, packed_segments, qkv
from tests.test_generate import PROMPTS, assert_decoding_equals_the_full_pass

TOL = 1e-5  # fp32, simple ops
TOL_MODEL = 1e-4  # fp32, whole models
CAP = 2.0  # small enough that tanh bends the scores of unit-normal q and k

# Gemma 2's options (plus-one norms, sandwich norms, scaled embeddings, GeGLU, softcaps, its query
# scale, local/global layers with a window shorter than the prompts) and Qwen's (q/k/v biases, q/k
# norms) with yarn RoPE and Gemma 3's separate local RoPE base.
GEMMA2 = dataclasses.replace(
    SMALL, max_seq_len=64, init_std=0.3, norm_plus_one=True, post_norms=True, embed_scale=True,
    activation="geglu", query_pre_attn_scalar=12.0, attn_logit_softcap=3.0, final_logit_softcap=5.0,
    sliding_window=6, sliding_window_pattern=2)
QWEN_YARN = dataclasses.replace(
    SMALL, max_seq_len=64, init_std=0.3, tie_embeddings=False, qkv_bias=True, qk_norm=True,
    rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_len=16, rope_theta=1000.0,
    sliding_window=6, sliding_window_pattern=2, rope_local_theta=100.0)


# ------------------------------------------------------------------------------------------ RoPE


def _hf_rope(kind: str, head_dim: int, theta: float, params: dict) -> tuple[np.ndarray, float]:
    """transformers' inverse frequencies and attention factor for a Llama config."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=131072,
                         rope_parameters={"rope_type": kind, "rope_theta": theta, **params})
    inv_freq, factor = ROPE_INIT_FUNCTIONS[kind](config)
    return inv_freq.numpy(), factor


# (kind, head_dim, theta, meshlm keys, transformers' rope_parameters): Llama 3.1's values (every
# llama3 band present), Qwen-style yarn with the default and an explicit attention factor, untruncated
ROPE_CASES = [
    ("linear", 64, 10000.0, {"rope_scaling_factor": 4.0}, {"factor": 4.0}),
    ("llama3", 128, 500000.0,
     {"rope_scaling_factor": 8.0, "rope_original_max_len": 8192, "rope_low_freq_factor": 1.0,
      "rope_high_freq_factor": 4.0},
     {"factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0}),
    ("yarn", 64, 1000000.0, {"rope_scaling_factor": 4.0, "rope_original_max_len": 32768},
     {"factor": 4.0, "original_max_position_embeddings": 32768}),
    ("yarn", 64, 10000.0,
     {"rope_scaling_factor": 8.0, "rope_original_max_len": 4096, "rope_attention_factor": 1.3,
      "rope_beta_fast": 16.0, "rope_beta_slow": 2.0, "rope_truncate": False},
     {"factor": 8.0, "original_max_position_embeddings": 4096, "attention_factor": 1.3,
      "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}),
]


@pytest.mark.parametrize("kind, head_dim, theta, ours, theirs", ROPE_CASES,
                         ids=["linear", "llama3", "yarn", "yarn-explicit"])
def test_rope_scaling_equals_transformers(kind, head_dim, theta, ours, theirs) -> None:
    cfg = ModelConfig(d_model=4 * head_dim, num_heads=4, num_kv_heads=4, rope_theta=theta,
                      rope_scaling=kind, **ours)
    assert not cfg.problems()
    rope = Rope.of(cfg)
    want_inv_freq, want_factor = _hf_rope(kind, head_dim, theta, theirs)
    np.testing.assert_allclose(rope.inv_freq(head_dim), want_inv_freq, rtol=TOL, atol=0)
    assert rope.attention_factor == pytest.approx(want_factor, rel=1e-12)
    if kind == "yarn":
        assert rope.attention_factor != 1.0


def test_rope_attention_factor_scales_cos_and_sin() -> None:
    x, _, _ = qkv(1, 5, 2, 2, 8)
    positions = jnp.arange(5)[None]
    inv_freq = Rope(10000.0).inv_freq(8)
    np.testing.assert_allclose(jax.jit(apply_rope)(x, positions, inv_freq, 1.5),
                               1.5 * reference.rope(x, positions, 10000.0), rtol=TOL, atol=TOL)


def test_local_layers_take_their_own_rope_also_when_traced() -> None:
    """With rope_local_theta a local layer rotates by plain RoPE at that base, a global one by the
    scaled RoPE; inside a stack mixing both the choice is a traced bool."""
    attn = nnx.eval_shape(lambda: Attention(QWEN_YARN, nnx.Rngs(0)))  # RoPE reads no parameter
    x, _, _ = qkv(2, 7, 4, 4, 8, seed=3)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    local_ref = reference.rope(x, positions, QWEN_YARN.rope_local_theta)
    scaled = Rope.of(QWEN_YARN)
    global_ref = apply_rope(x, positions, scaled.inv_freq(8), scaled.attention_factor)
    traced = jax.jit(lambda local: attn.rope(x, positions, local))
    for local, want in ((True, local_ref), (False, global_ref)):
        static = jax.jit(lambda x, positions, local=local: attn.rope(x, positions, local))
        np.testing.assert_allclose(static(x, positions), want, rtol=TOL, atol=TOL)
        np.testing.assert_allclose(traced(jnp.bool_(local)), want, rtol=TOL, atol=TOL)


# ------------------------------------------------------------------------------ soft-capped scores


def _outputs_and_grads(attention, q, k, v, cotangent):
    def loss(q, k, v):
        out = attention(q, k, v)
        return jnp.sum(out * cotangent), out
    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("traced", [False, True])
def test_softcapped_blockwise_attention_and_gradients_equal_the_einsum_path(traced: bool) -> None:
    """Packed rows and a window (fixed, or a traced per-layer value): blockwise's forward and its
    own backward pass through cap * tanh(s / cap) equal differentiating the einsum path, and the
    einsum path equals the NumPy oracle."""
    b, t, window = 2, 12, 5
    q, k, v = (3 * x for x in qkv(b, t, 4, 2, 8, seed=1))  # large scores: the cap matters
    seg = jnp.asarray(packed_segments(b, t))
    cotangent = jax.random.normal(jax.random.key(2), q.shape)

    def run(impl):
        def outputs_and_grads(q, k, v, local):
            attention = functools.partial(causal_attention, segment_ids_bt=seg, window=window,
                                          local=local if traced else True, impl=impl, block=5,
                                          softcap=CAP)
            return _outputs_and_grads(attention, q, k, v, cotangent)
        return jax.jit(outputs_and_grads)(q, k, v, jnp.bool_(True))

    blockwise, einsum = run("blockwise"), run("einsum")
    want = reference.attention(q, k, v, np.asarray(seg), window, softcap=CAP)
    assert reference.relative_error(einsum[0], want) < TOL
    assert reference.relative_error(einsum[0], reference.attention(q, k, v, np.asarray(seg), window)) > 1e-2
    np.testing.assert_allclose(blockwise[0], einsum[0], rtol=TOL, atol=TOL)
    for actual, expected in zip(blockwise[1], einsum[1], strict=True):
        np.testing.assert_allclose(actual, expected, rtol=TOL, atol=TOL)


def test_softcapped_context_parallel_attention_equals_the_einsum_path(eight_devices) -> None:
    """Queries split over 4 devices (the flash recurrence at each device's offset), packed, a
    window across the chunk boundaries: outputs and gradients of the unsharded einsum path."""
    b, t, window = 2, 16, 5
    mesh, rules = make_mesh(MeshConfig(data=1, context=4), eight_devices[:4]), default_rules()
    q, k, v = (3 * x for x in qkv(b, t, 4, 2, 8, seed=4))
    seg = jnp.asarray(packed_segments(b, t))
    cotangent = jax.random.normal(jax.random.key(5), q.shape)
    names = {"q": ("batch", "length", "heads", "head_dim"), "kv": ("batch", "length", "kv_heads", "head_dim")}
    args = [jax.device_put(x, logical_sharding(names[kind], x.shape, mesh, rules))
            for x, kind in ((q, "q"), (k, "kv"), (v, "kv"), (cotangent, "q"))]
    sharded = functools.partial(context_attention, segment_ids_bt=seg, window=window, block=3,
                                softcap=CAP)
    actual = jax.jit(under_activation_sharding(
        functools.partial(_outputs_and_grads, sharded), mesh, rules))(*args)
    expected = jax.jit(functools.partial(_outputs_and_grads, functools.partial(
        causal_attention, segment_ids_bt=seg, window=window, local=True, impl="einsum", block=3,
        softcap=CAP)))(q, k, v, cotangent)
    assert reference.relative_error(actual[0], expected[0]) < TOL
    for got, want in zip(actual[1], expected[1], strict=True):
        assert reference.relative_error(got, want) < TOL


def test_softcapped_splash_attention_equals_the_einsum_path() -> None:
    """The kernel's own attn_logits_soft_cap (interpret mode), packed rows, one block of 128."""
    b, t = 1, 128
    q, k, v = (3 * x for x in qkv(b, t, 2, 1, 16, seed=6))
    seg = jnp.asarray(packed_segments(b, t))
    cotangent = jax.random.normal(jax.random.key(7), q.shape)
    splash = jax.jit(functools.partial(_outputs_and_grads, functools.partial(
        splash_attention, segment_ids_bt=seg, window=0, interpret=True, softcap=CAP)))
    einsum = jax.jit(functools.partial(_outputs_and_grads, functools.partial(
        causal_attention, segment_ids_bt=seg, window=0, local=False, impl="einsum", block=128,
        softcap=CAP)))
    actual, expected = splash(q, k, v, cotangent), einsum(q, k, v, cotangent)
    assert reference.relative_error(actual[0], expected[0]) < TOL
    for got, want in zip(actual[1], expected[1], strict=True):
        assert reference.relative_error(got, want) < TOL


def test_kernels_that_cannot_softcap_are_not_picked() -> None:
    assert resolve_impl("xla", 16, jnp.float32, softcap=CAP) == "einsum"
    assert resolve_impl("xla", 1024, jnp.float32, softcap=CAP) == "blockwise"
    assert resolve_impl("auto", 16, jnp.float32, softcap=CAP) == "einsum"
    assert resolve_impl("xla", 16, jnp.float32) == "xla"


# ------------------------------------------------------------------------------- layers and heads


def _randomise(module: nnx.Module, seed: int) -> None:
    """Every parameter of ``module`` replaced by N(0, 0.5^2) values (biases and norm scales too),
    drawn in NumPy so that no leaf's shape compiles a program of its own."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    nnx.update(module, jax.tree.unflatten(
        treedef, [jnp.asarray(0.5 * rng.normal(size=x.shape), jnp.float32) for x in leaves]))


def _normal(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def test_attention_options_equal_a_numpy_computation() -> None:
    """q/k/v biases, plus-one q/k norms before RoPE, query_pre_attn_scalar and a soft cap: the layer
    equals projecting, norming, rotating and attending in NumPy (float64)."""
    cfg = dataclasses.replace(SMALL, qkv_bias=True, qk_norm=True, norm_plus_one=True,
                              query_pre_attn_scalar=5.0, attn_logit_softcap=CAP, attention_impl="einsum")
    attn = nnx.eval_shape(lambda: Attention(cfg, nnx.Rngs(0)))  # every initial value replaced
    _randomise(attn, 1)
    x = _normal((2, 6, cfg.d_model), 2)
    positions = np.broadcast_to(np.arange(6), (2, 6))
    p = {name: np.asarray(value[...], np.float64) for name, value in vars(attn).items()
         if isinstance(value, nnx.Param)}
    q = np.einsum("btd,dnh->btnh", x, p["w_q_dnh"]) + p["b_q_nh"]
    k = np.einsum("btd,dkh->btkh", x, p["w_k_dkh"]) + p["b_k_kh"]
    v = np.einsum("btd,dkh->btkh", x, p["w_v_dkh"]) + p["b_v_kh"]
    q = reference.rope(reference.rms_norm(q, 1 + np.asarray(attn.q_norm.scale[...]), cfg.norm_eps),
                       positions, cfg.rope_theta)
    k = reference.rope(reference.rms_norm(k, 1 + np.asarray(attn.k_norm.scale[...]), cfg.norm_eps),
                       positions, cfg.rope_theta)
    out = reference.attention(q, k, v, scale=cfg.query_pre_attn_scalar ** -0.5, softcap=CAP)
    want = np.einsum("btnh,nhd->btd", out, p["w_o_nhd"])
    got, _ = nnx.jit(lambda attn, x, positions: attn(x, Span(positions)))(
        attn, jnp.asarray(x, jnp.float32), positions)
    assert reference.relative_error(got, want) < TOL


def test_plus_one_norm_starts_at_the_identity_scale() -> None:
    norm = RMSNorm(16, dataclasses.replace(SMALL, norm_plus_one=True), nnx.Rngs(0))
    assert not np.any(np.asarray(norm.scale[...]))
    norm.scale[...] = jnp.linspace(-1, 1, 16)
    x = jax.random.normal(jax.random.key(0), (2, 3, 16))
    want = reference.rms_norm(x, 1 + np.linspace(-1, 1, 16), SMALL.norm_eps)
    np.testing.assert_allclose(norm(x), want, rtol=TOL, atol=TOL)


def test_geglu_gates_with_tanh_gelu() -> None:
    cfg = dataclasses.replace(SMALL, activation="geglu")
    mlp = nnx.eval_shape(lambda: MLP(cfg, nnx.Rngs(0)))  # every initial value replaced
    _randomise(mlp, 0)
    x = _normal((2, 3, cfg.d_model), 1)
    gate, up = x @ np.asarray(mlp.w_gate_df[...]), x @ np.asarray(mlp.w_up_df[...])
    gelu_tanh = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)))
    want = (gelu_tanh * up) @ np.asarray(mlp.w_down_fd[...])
    got = nnx.jit(lambda mlp, x: mlp(x))(mlp, jnp.asarray(x, jnp.float32))
    assert reference.relative_error(got, want) < TOL


def test_embed_scale_scales_the_lookup_but_not_the_tied_head() -> None:
    cfg = dataclasses.replace(SMALL, embed_scale=True)
    model = Transformer(cfg, nnx.Rngs(0))
    tokens = jnp.array([[3, 1, 4, 1, 5]])
    table = np.asarray(model.embed.table_vd[...])
    np.testing.assert_allclose(model.embed(tokens), table[[3, 1, 4, 1, 5]][None] * math.sqrt(32),
                               rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(model.head_weight_vd(), table)
    assert Embed(SMALL, nnx.Rngs(0)).scale is None


def test_final_logit_softcap_caps_logits_and_the_chunked_loss() -> None:
    x, w = _normal((2, 7, 16), 0).astype(np.float32), _normal((40, 16), 1).astype(np.float32)
    targets = np.arange(14).reshape(2, 7) % 40
    weights = np.ones((2, 7), np.float32)

    @jax.jit  # one program for the four results, not one per eager op
    def results(x, w, targets, weights):
        capped = lm_logits(x, w, 5.0)
        return (lm_logits(x, w), capped, jnp.sum(token_nll(capped, targets)),
                chunked_nll_sum(x, w, targets, weights, 3, 5.0))

    plain, capped, whole, chunked = results(x, w, targets, weights)
    np.testing.assert_allclose(capped, 5.0 * np.tanh(np.asarray(plain, np.float64) / 5.0),
                               rtol=TOL, atol=TOL)
    np.testing.assert_allclose(chunked, whole, rtol=TOL)


def test_parameter_tree_and_count_with_every_option() -> None:
    model = Transformer(dataclasses.replace(GEMMA2, qkv_bias=True, qk_norm=True), nnx.Rngs(0))
    paths = {tuple(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for new in (("attn", "b_q_nh"), ("attn", "b_k_kh"), ("attn", "b_v_kh"), ("attn", "q_norm", "scale"),
                ("attn", "k_norm", "scale"), ("attn_post_norm", "scale"), ("mlp_post_norm", "scale")):
        assert ("blocks",) + new in paths
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert param_counts(model.cfg)["total"] == count


# ------------------------------------------------------------------------------------ config checks


@pytest.mark.parametrize("overrides, key", [
    ({"attn_logit_softcap": -1.0}, "attn_logit_softcap"),
    ({"final_logit_softcap": float("nan")}, "final_logit_softcap"),
    ({"query_pre_attn_scalar": -2.0}, "query_pre_attn_scalar"),
    ({"attn_logit_softcap": 30.0, "attention_impl": "xla"}, "attention_impl"),
    ({"activation": "geglu", "num_experts": 4}, "activation"),
    ({"activation": "relu"}, "activation"),
    ({"rope_scaling": "dynamic"}, "rope_scaling"),
    ({"rope_scaling": "linear", "position": "learned"}, "rope_scaling"),
    ({"rope_scaling_factor": 0.0}, "rope_scaling_factor"),
    ({"rope_original_max_len": -1}, "rope_original_max_len"),
    ({"rope_scaling": "llama3", "rope_low_freq_factor": 4.0, "rope_high_freq_factor": 4.0},
     "rope_high_freq_factor"),
    ({"rope_beta_fast": 0.0}, "rope_beta_fast"),
    ({"rope_attention_factor": -1.0}, "rope_attention_factor"),
    ({"rope_local_theta": -1.0}, "rope_local_theta"),
])
def test_bad_options_are_config_problems(overrides: dict, key: str) -> None:
    problems = dataclasses.replace(SMALL, **overrides).problems()
    assert [k for k, _ in problems] == [key], problems


def test_the_option_configs_have_no_problems() -> None:
    assert not GEMMA2.problems() and not QWEN_YARN.problems()


# --------------------------------------------------------------------------- decoding over a cache


@pytest.mark.parametrize("cfg", [GEMMA2, QWEN_YARN], ids=["gemma2", "qwen-yarn-local-rope"])
def test_cached_decoding_with_the_options_equals_the_full_forward_pass(eight_devices, cfg) -> None:
    assert_decoding_equals_the_full_pass(cfg, {"data": -1, "tensor": 2}, PROMPTS, 9)
