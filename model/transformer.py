"""The decoder: pre-norm blocks (RMSNorm -> attention, RMSNorm -> MLP) stacked on a leading
``layers`` axis and run by ``jax.lax.scan`` (compile time flat in depth) or unrolled, then a final
norm and a tied or untied LM head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import Attention, causal_mask
from model.config import ModelConfig
from model.layers import MLP, Embed, LearnedPositions, RMSNorm, param
from sharding.constrain import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array) -> jax.Array:
        x_btd = x_btd + self.attn(self.attn_norm(x_btd), positions_bt, mask_bts)
        x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
        return constrain(x_btd, ("batch", "length", "embed"))


class Transformer(nnx.Module):
    """Decoder-only LM: tokens [B, T] -> logits [B, T, V] (float32)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs)
        if cfg.position == "learned":
            self.positions = LearnedPositions(cfg, rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg, rngs)
        if not cfg.tie_embeddings:
            self.head_dv = param(rngs, nnx.initializers.normal(cfg.init_std),
                                 (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype)

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
                 segment_ids_bt: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask_bts = causal_mask(segment_ids_bt, b, t)
        x_btd = self.embed(tokens_bt)
        if cfg.position == "learned":
            x_btd = x_btd + self.positions(positions_bt).astype(x_btd.dtype)

        graphdef, stacked = nnx.split(self.blocks)

        def block_fn(x_btd, layer_state):
            return nnx.merge(graphdef, layer_state)(x_btd, positions_bt, mask_bts)

        if cfg.remat != "none":
            block_fn = jax.checkpoint(block_fn, policy=REMAT_POLICIES[cfg.remat])
        if cfg.scan_layers:
            x_btd, _ = jax.lax.scan(lambda x, s: (block_fn(x, s), None), x_btd, stacked)
        else:
            for i in range(cfg.num_layers):
                x_btd = block_fn(x_btd, jax.tree.map(lambda a, i=i: a[i], stacked))

        x_btd = self.final_norm(x_btd)
        if cfg.tie_embeddings:
            logits_btv = self.embed.attend(x_btd)
        else:
            logits_btv = jnp.einsum("btd,dv->btv", x_btd, self.head_dv[...].astype(x_btd.dtype))
        logits_btv = constrain(logits_btv.astype(jnp.float32), ("batch", "length", "vocab"))
        return logits_btv
