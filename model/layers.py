"""Building blocks: RMSNorm, token embedding, RoPE (with transformers' scaling types), learned
positions, the MLP."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.lora import adapted
from model.primitives import dense, param
from sharding.constrain import constrain


def ones_init(key: jax.Array | None, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    del key
    return jnp.ones(shape, dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis with a learned scale, always computed in float32;
    with ``norm_plus_one`` (Gemma) it multiplies by 1 + scale, the scale starting at 0."""

    def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs, axes: tuple[str] = ("embed",)):
        self.plus_one = cfg.norm_plus_one
        init = nnx.initializers.zeros if self.plus_one else ones_init
        self.scale = param(None, init, (dim,), axes, cfg.param_dtype)
        self.eps = cfg.norm_eps

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x32 = x_btd.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if self.plus_one:
            scale = 1.0 + scale
        return (x32 * inv_rms * scale).astype(x_btd.dtype)


class Embed(nnx.Module):
    """Token embedding table [V, D] (also the LM head's weight when it is tied)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.table_vd = param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                              ("vocab", "embed"), cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.scale = math.sqrt(cfg.d_model) if cfg.embed_scale else None

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        """The embeddings [B, T, D] in the compute dtype; with ``embed_scale`` times sqrt(D), the
        factor rounded to the compute dtype first (as transformers' Gemma does)."""
        # Gather from the table with its embed dimension whole (an all-gather under FSDP, as for
        # every weight); rows stay sharded over whatever the vocab axis uses.
        table_vd = constrain(self.table_vd[...], ("vocab", None))
        x_btd = jnp.take(table_vd, tokens_bt, axis=0).astype(self.dtype)
        if self.scale is not None:
            x_btd = x_btd * jnp.asarray(self.scale, self.dtype)
        return constrain(x_btd, ("batch", "length", "embed"))


class LearnedPositions(nnx.Module):
    """Learned absolute position embeddings [max_seq_len, D], added to the token embeddings."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.table_td = param(rngs, nnx.initializers.normal(cfg.init_std),
                              (cfg.max_seq_len, cfg.d_model), ("positions", "embed"), cfg.param_dtype)

    def __call__(self, positions_bt: jax.Array) -> jax.Array:
        return jnp.take(self.table_td[...], positions_bt, axis=0)


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies [H/2] of rotary embeddings: theta^(-2i/H)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


@dataclasses.dataclass(frozen=True)
class Rope:
    """One kind of layer's rotary embedding: base ``theta`` and a scaling ``kind`` with its
    parameters, computed as transformers' ROPE_INIT_FUNCTIONS compute them (float32 throughout)."""

    theta: float
    kind: str = "none"
    factor: float = 1.0
    original_max_len: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    yarn_attention_factor: float = 0.0
    truncate: bool = True

    @classmethod
    def of(cls, cfg: ModelConfig, local: bool = False) -> Rope:
        """The RoPE of ``cfg``'s global layers, or of its local ones (``rope_local_theta``, when
        set: plain RoPE at that base)."""
        if local and cfg.rope_local_theta:
            return cls(cfg.rope_local_theta)
        return cls(cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor,
                   cfg.rope_original_max_len or cfg.max_seq_len, cfg.rope_low_freq_factor,
                   cfg.rope_high_freq_factor, cfg.rope_beta_fast, cfg.rope_beta_slow,
                   cfg.rope_attention_factor, cfg.rope_truncate)

    @property
    def attention_factor(self) -> float:
        """The factor on cos and sin: yarn's (default 0.1 ln(factor) + 1 for factor > 1), else 1."""
        if self.kind != "yarn":
            return 1.0
        if self.yarn_attention_factor:
            return self.yarn_attention_factor
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0

    def inv_freq(self, head_dim: int) -> jax.Array:
        """Inverse frequencies [H/2] in float32."""
        base = rope_frequencies(head_dim, self.theta)
        if self.kind == "linear":
            return base / self.factor
        if self.kind == "llama3":
            return self._llama3(base)
        if self.kind == "yarn":
            return self._yarn(base, head_dim)
        return base

    def _llama3(self, inv_freq: jax.Array) -> jax.Array:
        old, low, high = self.original_max_len, self.low_freq_factor, self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old / low, inv_freq / self.factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return jnp.where(medium, smoothed, scaled)

    def _yarn(self, extrapolation: jax.Array, head_dim: int) -> jax.Array:
        def correction_dim(rotations: float) -> float:
            return (head_dim * math.log(self.original_max_len / (rotations * 2 * math.pi))
                    / (2 * math.log(self.theta)))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # as transformers: no division by zero
        ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
        pos_freqs = self.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
        interpolation = 1.0 / (self.factor * pos_freqs)
        keep = 1 - ramp  # the share of each dimension's frequency left unscaled
        return interpolation * (1 - keep) + extrapolation * keep


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float | jax.Array,
               attention_factor: float | jax.Array = 1.0) -> jax.Array:
    """Rotates pairs (x[i], x[i + H/2]) by angle position * theta^(-2i/H) (the Llama/NeoX layout).
    ``theta``: the base, or the inverse frequencies [H/2] themselves (``Rope.inv_freq``);
    ``attention_factor`` multiplies cos and sin (yarn)."""
    head_dim = x_btnh.shape[-1]
    inv_freq = rope_frequencies(head_dim, theta) if isinstance(theta, int | float) else theta
    angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq
    sin = jnp.sin(angles_bth)[:, :, None, :]
    cos = jnp.cos(angles_bth)[:, :, None, :]
    if not isinstance(attention_factor, int | float) or attention_factor != 1.0:
        sin, cos = sin * attention_factor, cos * attention_factor
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


class MLP(nnx.Module):
    """Feed-forward block: SwiGLU (silu(x W_gate) * x W_up) W_down, GeGLU (the same with the
    tanh-approximated GELU as the gate, Gemma's gelu_pytorch_tanh), or GELU (gelu(x W_up) W_down)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        out_init = nnx.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        d, f = cfg.d_model, cfg.mlp_dim
        self.activation = cfg.activation
        self.dtype = jnp.dtype(cfg.dtype)
        self.fused = cfg.fused_projections
        if cfg.gated_mlp:
            self.w_gate_df = param(rngs, init, (d, f), ("embed", "mlp"), cfg.param_dtype)
        self.w_up_df = param(rngs, init, (d, f), ("embed", "mlp"), cfg.param_dtype)
        self.w_down_fd = param(rngs, out_init, (f, d), ("mlp", "embed"), cfg.param_dtype)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        w_up_df = self.w_up_df[...].astype(self.dtype)
        if self.activation in ("swiglu", "geglu"):
            w_gate_df = self.w_gate_df[...].astype(self.dtype)
            if self.fused:  # one matmul against [gate | up], split again
                gate_btf, up_btf = jnp.split(
                    dense(x_btd, jnp.concatenate([w_gate_df, w_up_df], axis=1)), 2, axis=-1)
            else:
                gate_btf, up_btf = dense(x_btd, w_gate_df), dense(x_btd, w_up_df)
            gate_btf = adapted(self, "gate", x_btd, gate_btf)
            up_btf = adapted(self, "up", x_btd, up_btf)
            if self.activation == "swiglu":
                h_btf = jax.nn.silu(gate_btf) * up_btf
            else:
                h_btf = jax.nn.gelu(gate_btf, approximate=True) * up_btf
        else:
            h_btf = jax.nn.gelu(adapted(self, "up", x_btd, dense(x_btd, w_up_df)))
        h_btf = constrain(h_btf, ("batch", "length", "mlp"))
        out_btd = adapted(self, "down", h_btf,
                          dense(h_btf, self.w_down_fd[...].astype(self.dtype)))
        return constrain(out_btd, ("batch", "length", "embed"))
