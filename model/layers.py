"""Building blocks: RMSNorm, token embedding, RoPE, learned positions, the MLP."""

from __future__ import annotations

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
    """Root-mean-square norm with a learned scale, always computed in float32."""

    def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
        self.scale = param(None, ones_init, (dim,), ("embed",), cfg.param_dtype)
        self.eps = cfg.norm_eps

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x32 = x_btd.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * self.scale[...].astype(jnp.float32)).astype(x_btd.dtype)


class Embed(nnx.Module):
    """Token embedding table [V, D] (also the LM head's weight when it is tied)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.table_vd = param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                              ("vocab", "embed"), cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        # Gather from the table with its embed dimension whole (an all-gather under FSDP, as for
        # every weight); rows stay sharded over whatever the vocab axis uses.
        table_vd = constrain(self.table_vd[...], ("vocab", None))
        x_btd = jnp.take(table_vd, tokens_bt, axis=0).astype(self.dtype)
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


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotates pairs (x[i], x[i + H/2]) by angle position * theta^(-2i/H) (the Llama/NeoX layout)."""
    head_dim = x_btnh.shape[-1]
    angles_bth = positions_bt[..., None].astype(jnp.float32) * rope_frequencies(head_dim, theta)
    sin = jnp.sin(angles_bth)[:, :, None, :]
    cos = jnp.cos(angles_bth)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


class MLP(nnx.Module):
    """Feed-forward block: SwiGLU (silu(x W_gate) * x W_up) W_down, or GELU (gelu(x W_up) W_down)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        out_init = nnx.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        d, f = cfg.d_model, cfg.mlp_dim
        self.activation = cfg.activation
        self.dtype = jnp.dtype(cfg.dtype)
        self.fused = cfg.fused_projections
        if cfg.activation == "swiglu":
            self.w_gate_df = param(rngs, init, (d, f), ("embed", "mlp"), cfg.param_dtype)
        self.w_up_df = param(rngs, init, (d, f), ("embed", "mlp"), cfg.param_dtype)
        self.w_down_fd = param(rngs, out_init, (f, d), ("mlp", "embed"), cfg.param_dtype)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        w_up_df = self.w_up_df[...].astype(self.dtype)
        if self.activation == "swiglu":
            w_gate_df = self.w_gate_df[...].astype(self.dtype)
            if self.fused:  # one matmul against [gate | up], split again
                gate_btf, up_btf = jnp.split(
                    dense(x_btd, jnp.concatenate([w_gate_df, w_up_df], axis=1)), 2, axis=-1)
            else:
                gate_btf, up_btf = dense(x_btd, w_gate_df), dense(x_btd, w_up_df)
            gate_btf = adapted(self, "gate", x_btd, gate_btf)
            up_btf = adapted(self, "up", x_btd, up_btf)
            h_btf = jax.nn.silu(gate_btf) * up_btf
        else:
            h_btf = jax.nn.gelu(adapted(self, "up", x_btd, dense(x_btd, w_up_df)))
        h_btf = constrain(h_btf, ("batch", "length", "mlp"))
        out_btd = adapted(self, "down", h_btf,
                          dense(h_btf, self.w_down_fd[...].astype(self.dtype)))
        return constrain(out_btd, ("batch", "length", "embed"))
