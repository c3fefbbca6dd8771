"""Multi-head latent attention (model/mla.py): the layer against a NumPy float64 computation from
DeepSeek-V2's formulas (full-rank and low-rank queries, value heads narrower and wider than the
query/key heads, through the kernels that take them as they are and those that need padding),
cached decoding over the latent against the full forward pass, gradients on a sharded mesh against
one device, LoRA on its projections, the config refusals, and its parameter, FLOP and KV-cache
accounting."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cli import scaling
from eval.scaling_runs import compiled_flops
from model.attention import Span
from model.config import ModelConfig
from model.flops import kv_cache_bytes_per_token, pair_flops, param_counts
from model.lora import LoRASpec, add_lora, merge_lora, set_deterministic, unmatched_targets
from model.mla import MLAttention
from model.transformer import Transformer, cache_shapes
from tests import reference
from tests.helpers import SMALL, host_params, loss_and_grads, packed_segments, random_batch
from tests.test_generate import PROMPTS, assert_decoding_equals_the_full_pass
from train.config import CONFIG_DIR, load_config

TOL = 1e-5  # fp32, simple ops
TOL_MODEL = 1e-4  # fp32, whole models
CAP = 2.0

# C = 12, R = 4, P = 6: query/key heads of 10
MLA = dataclasses.replace(SMALL, attention_type="mla", kv_lora_rank=12, qk_rope_head_dim=4,
                          qk_nope_head_dim=6)
# every option MLA keeps, for decoding: a low-rank query, narrower values, local and global layers
# with their own RoPE (yarn globally), a soft cap and DeepSeek's query scale
MLA_DECODE = dataclasses.replace(
    MLA, max_seq_len=64, init_std=0.3, tie_embeddings=False, q_lora_rank=10, v_head_dim=5,
    sliding_window=6, sliding_window_pattern=2, rope_scaling="yarn", rope_scaling_factor=4.0,
    rope_original_max_len=16, rope_local_theta=100.0, attn_logit_softcap=3.0,
    query_pre_attn_scalar=12.0)


def _randomised(module: nnx.Module, seed: int) -> nnx.Module:
    """``module`` with every parameter (norm scales too) drawn from N(0, 0.5^2); drawn in NumPy,
    so that no leaf's shape compiles a program of its own."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    nnx.update(module, jax.tree.unflatten(
        treedef, [jnp.asarray(0.5 * rng.normal(size=x.shape), jnp.float32) for x in leaves]))
    return module


def _random_mla(cfg: ModelConfig, seed: int) -> MLAttention:
    """An MLA layer of ``cfg`` with ``_randomised`` parameters; built abstractly (every initial
    value is replaced, so none is computed)."""
    return _randomised(nnx.eval_shape(lambda: MLAttention(cfg, nnx.Rngs(0))), seed)


def _normal(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def mla_reference(x, p: dict, cfg: ModelConfig, positions, segments=None, window=0):
    """DeepSeek-V2's MLA in float64: q = x W_q (or RMSNorm(x W_q_down) W_q_up), split into nope and
    rope parts; c = RMSNorm(x W_kv_down); k = [c W_k_up | RoPE(x W_k_rope) for every head];
    v = c W_v_up; softmax(q k^T * scale) v W_o, the rope parts rotated at their positions."""
    x = np.asarray(x, np.float64)
    nope, eps = cfg.qk_nope_head_dim, cfg.norm_eps
    if cfg.q_lora_rank:
        q_latent = reference.rms_norm(x @ p["w_q_down_dr"], p["q_latent_norm"], eps)
        q = np.einsum("btr,rnh->btnh", q_latent, p["w_q_up_rnh"])
    else:
        q = np.einsum("btd,dnh->btnh", x, p["w_q_dnh"])
    q = np.concatenate([q[..., :nope], reference.rope(q[..., nope:], positions, cfg.rope_theta)], -1)
    c = reference.rms_norm(x @ p["w_kv_down_dc"], p["kv_latent_norm"], eps)
    k_rope = reference.rope((x @ p["w_k_rope_dr"])[:, :, None], positions, cfg.rope_theta)
    k_nope = np.einsum("btc,cnh->btnh", c, p["w_k_up_cnh"])
    k = np.concatenate([k_nope, np.broadcast_to(k_rope, k_nope.shape[:3] + k_rope.shape[3:])], -1)
    v = np.einsum("btc,cnh->btnh", c, p["w_v_up_cnh"])
    scale = (cfg.query_pre_attn_scalar or q.shape[-1]) ** -0.5
    out = reference.attention(q, k, v, segments, window, scale=scale, softcap=cfg.attn_logit_softcap)
    return np.einsum("btnh,nhd->btd", out, p["w_o_nhd"])


def _params(attn: MLAttention) -> dict[str, np.ndarray]:
    out = {name: np.asarray(value[...], np.float64) for name, value in vars(attn).items()
           if isinstance(value, nnx.Param)}
    for norm in ("q_latent_norm", "kv_latent_norm"):
        if hasattr(attn, norm):
            out[norm] = np.asarray(getattr(attn, norm).scale[...], np.float64)
    return out


@pytest.mark.parametrize("changes, packed, local", [
    ({"attention_impl": "einsum"}, True, False),
    ({"attention_impl": "blockwise", "attention_block": 4, "q_lora_rank": 10, "v_head_dim": 5,
      "attn_logit_softcap": CAP, "sliding_window": 3}, False, True),
    ({"attention_impl": "xla", "q_lora_rank": 10, "v_head_dim": 12, "query_pre_attn_scalar": 7.0},
     True, False),
], ids=["full-rank-q-einsum", "low-rank-q-narrow-v-blockwise-window-softcap",
        "wide-v-xla-query-scale"])
def test_mla_equals_a_numpy_reference(changes: dict, packed: bool, local: bool) -> None:
    """einsum takes value heads of another width as they are; blockwise pads the values to the
    query/key width and xla pads the queries and keys to the value width."""
    cfg = dataclasses.replace(MLA, **changes)
    attn = _random_mla(cfg, 1)
    x = _normal((2, 7, cfg.d_model), 2)
    positions = np.broadcast_to(np.arange(7, dtype=np.int32), (2, 7))
    segments = packed_segments(2, 7) if packed else None
    got, cache = nnx.jit(lambda attn, x, positions, segments: attn(
        x, Span(positions, segments), local=local))(attn, x, positions, segments)
    want = mla_reference(x, _params(attn), cfg, positions, segments,
                         cfg.sliding_window if local else 0)
    assert cache is None and got.shape == x.shape
    assert reference.relative_error(got, want) < TOL


def test_splash_takes_narrower_values_as_they_are() -> None:
    """Splash (interpreted here) has its own value head width: output and gradients equal the
    einsum path's at the 128 tokens the kernel tiles."""
    cfg = dataclasses.replace(MLA, v_head_dim=5, max_seq_len=128)
    x = _normal((1, 128, cfg.d_model), 2)
    span = Span(jnp.broadcast_to(jnp.arange(128), (1, 128)))
    results = []
    for impl in ("einsum", "splash"):
        attn = _random_mla(dataclasses.replace(cfg, attention_impl=impl), 1)
        loss = nnx.jit(nnx.value_and_grad(lambda a: jnp.sum(a(x, span)[0] ** 2)))
        results.append(loss(attn))
    for want, got in zip(*(jax.tree.leaves(r) for r in results), strict=True):
        assert reference.relative_error(got, want) < TOL


def test_sown_attention_weights_leave_the_output_unchanged() -> None:
    attn = _random_mla(dataclasses.replace(MLA, v_head_dim=5), 3)
    x = _normal((2, 5, MLA.d_model), 4)
    positions = np.broadcast_to(np.arange(5, dtype=np.int32), (2, 5))
    plain, _ = nnx.jit(lambda attn, x, positions: attn(x, Span(positions)))(attn, x, positions)
    attn.sow_intermediates = True
    (sown, _), intermediates = nnx.jit(lambda attn, x, positions: nnx.capture(
        attn, nnx.Intermediate)(x, Span(positions)))(attn, x, positions)
    probs = intermediates["attention_probs"][0]
    assert reference.relative_error(sown, plain) < TOL
    assert probs.shape == (2, MLA.num_heads, 5, 5)
    np.testing.assert_allclose(np.sum(probs, -1), 1.0, rtol=TOL)
    assert not np.any(np.triu(np.asarray(probs), 1))  # causal


def test_cached_decoding_over_the_latent_equals_the_full_forward_pass(eight_devices) -> None:
    """Decoding absorbs W_k_up and W_v_up into the query and output instead of expanding the
    cached latents; the full pass expands them."""
    assert_decoding_equals_the_full_pass(MLA_DECODE, {"data": -1, "tensor": 2}, PROMPTS, 9)


def test_the_cache_keeps_the_latent_and_the_rope_key() -> None:
    c, r = cache_shapes(MLA_DECODE, 3, 32)["blocks"]
    assert c.shape == (2, 3, 32, 1, 12) and r.shape == (2, 3, 32, 1, 4)


def test_sharded_mla_loss_and_gradients_equal_one_device(eight_devices) -> None:
    """fsdp (weights), tensor (heads) and context (the sequence: the context-parallel kernel, which
    takes padded values) against one device; every gradient finite and every weight's nonzero."""
    cfg = dataclasses.replace(MLA, q_lora_rank=10, v_head_dim=5, init_std=0.3)
    batch, params = random_batch(4, 16, cfg.vocab_size), host_params(cfg)
    loss_1, grads_1 = loss_and_grads(cfg, {"data": 1}, batch, devices=eight_devices[:1],
                                     params=params)
    loss_n, grads_n = loss_and_grads(cfg, {"fsdp": 2, "context": 2, "tensor": 2}, batch,
                                     params=params)
    assert abs(loss_n - loss_1) <= TOL_MODEL * abs(loss_1)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_n),
                            jax.tree.leaves(grads_1), strict=True):
        assert np.all(np.isfinite(a)) and np.any(a), path
        assert reference.relative_error(a, b) < TOL_MODEL, path


def test_lora_adapts_the_full_rank_query_and_the_output() -> None:
    cfg = dataclasses.replace(MLA, attention_impl="einsum")
    model = _randomised(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), 6)
    add_lora(model, LoRASpec(rank=2, targets=("q", "k", "v", "o")), nnx.Rngs(1))
    adapted = {name for name in vars(model.blocks.attn) if name.startswith("lora_")}
    assert adapted == {"lora_q", "lora_o"}
    for name in adapted:  # B starts at zero: give the adapters an update to apply
        lora = getattr(model.blocks.attn, name)
        lora.b[...] = jnp.asarray(0.1 * _normal(lora.b.shape, 5))
    tokens = np.arange(14).reshape(2, 7) % cfg.vocab_size
    forward = nnx.jit(lambda model, tokens: model(tokens))
    with_adapters = forward(set_deterministic(model, True), tokens)
    assert reference.relative_error(forward(merge_lora(model), tokens), with_adapters) < TOL_MODEL
    assert unmatched_targets(cfg, LoRASpec()) == ["k", "v"]
    low_rank_q = dataclasses.replace(cfg, q_lora_rank=8)
    assert unmatched_targets(low_rank_q, LoRASpec(targets=("q", "o"))) == ["q"]


@pytest.mark.parametrize("changes, key", [
    ({"qkv_bias": True}, "qkv_bias"),
    ({"qk_norm": True}, "qk_norm"),
    ({"fused_projections": True}, "fused_projections"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"qk_rope_head_dim": 3}, "qk_rope_head_dim"),
    ({"position": "learned"}, "position"),
    ({"attention_type": "mqa"}, "attention_type"),
])
def test_mla_config_refusals_name_the_key(changes: dict, key: str) -> None:
    problems = dataclasses.replace(MLA, **changes).problems()
    assert [k for k, _ in problems] == [key], problems
    assert not MLA.problems() and not MLA_DECODE.problems()


# ---------------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("cfg", [MLA, MLA_DECODE], ids=["full-rank-q", "low-rank-q"])
def test_parameter_count_equals_the_initialised_state(cfg: ModelConfig) -> None:
    _, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    assert sum(x.size for x in jax.tree.leaves(params)) == param_counts(cfg)["total"]


def test_kv_cache_and_attention_flops_count_the_latent_and_the_head_widths() -> None:
    l, c, r = MLA.num_layers, MLA.kv_lora_rank, MLA.qk_rope_head_dim
    assert kv_cache_bytes_per_token(MLA) == l * (c + r) * 4
    assert kv_cache_bytes_per_token(MLA, "bfloat16") == l * (c + r) * 2
    assert pair_flops(dataclasses.replace(MLA, v_head_dim=5)) == 2 * 4 * (6 + 4 + 5)


def test_flop_formula_within_5_percent_of_xla_cost_analysis() -> None:
    """The tiny preset with MLA heads (a low-rank query, narrower values); measured 0.97."""
    cfg = dataclasses.replace(load_config(CONFIG_DIR / "tiny.yaml", []).model, attention_type="mla",
                              kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                              v_head_dim=12, q_lora_rank=24)
    got = compiled_flops(cfg, 16, 32)
    for step in ("train", "eval"):
        assert abs(got[f"formula_{step}_flops"] / got[f"xla_{step}_flops"] - 1) < 0.05, got


def test_account_reports_the_latent_cache_against_gqa(capsys) -> None:
    mla = ["model.attention_type=mla", "model.kv_lora_rank=32", "model.qk_rope_head_dim=8",
           "model.qk_nope_head_dim=16", "--seq-len", "32"]
    assert scaling.main(["account", "--config", "tiny", *mla, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_cache_bytes_per_token"] == 2 * (32 + 8) * 4  # 2 layers, float32
    assert out["kv_cache_bytes_per_token_gqa"] == 2 * 2 * 4 * (16 + 8) * 4  # K and V of 4 heads
    assert scaling.main(["account", "--config", "tiny", *mla, "--kv-dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    assert "KV cache: 160 bytes/token (MLA: latent 32 + rope key 8 per layer)" in text
    assert "768 bytes/token, 4.8x as large" in text
