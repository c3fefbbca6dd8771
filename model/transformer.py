"""The decoder: pre-norm blocks (RMSNorm -> attention, RMSNorm -> MLP or MoE) stacked on a leading
``layers`` axis and run by ``jax.lax.scan`` (compile time flat in depth) or unrolled, then a final
norm and a tied or untied LM head.

Stacks: ``blocks`` holds the first dense layers (all layers of a dense model); an MoE model then
scans over groups of ``moe_every`` layers: ``group_blocks`` (moe_every - 1 dense blocks per group,
stored flat) followed by one of ``moe_blocks``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import Attention, causal_mask
from model.config import ModelConfig
from model.layers import MLP, Embed, LearnedPositions, RMSNorm, param
from model.moe import MoE
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


class MoEBlock(nnx.Module):
    """x + attn(norm(x)), then x + moe(norm(x)); also returns the MoE layer's metrics."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.moe = MoE(cfg, rngs)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array,
                 routing_mask_bt: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
        x_btd = x_btd + self.attn(self.attn_norm(x_btd), positions_bt, mask_bts)
        y_btd, metrics = self.moe(self.mlp_norm(x_btd), routing_mask_bt)
        return constrain(x_btd + y_btd, ("batch", "length", "embed")), metrics


def stack(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """``count`` modules made by ``make(rngs)``, their parameters stacked on a leading ``layers`` axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_stack(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    return make_stack(rngs)


def run_stack(fn: Callable, x_btd: jax.Array, stacked: Any, count: int,
              scan: bool) -> tuple[jax.Array, Any]:
    """Applies ``fn(x, layer_state) -> (x, out)`` to each of ``count`` stacked layers in turn;
    returns x and the outputs stacked on a leading axis."""
    if scan:
        return jax.lax.scan(fn, x_btd, stacked)
    outs = []
    for i in range(count):
        x_btd, out = fn(x_btd, jax.tree.map(lambda a, i=i: a[i], stacked))
        outs.append(out)
    return x_btd, jax.tree.map(lambda *o: jnp.stack(o), *outs)


class Transformer(nnx.Module):
    """Decoder-only LM: tokens [B, T] -> logits [B, T, V] (float32)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs)
        if cfg.position == "learned":
            self.positions = LearnedPositions(cfg, rngs)
        if cfg.num_dense_first:
            self.blocks = stack(lambda r: Block(cfg, r), cfg.num_dense_first, rngs)
        groups = cfg.num_moe_layers
        if groups and cfg.moe_every > 1:
            self.group_blocks = stack(lambda r: Block(cfg, r), groups * (cfg.moe_every - 1), rngs)
        if groups:
            self.moe_blocks = stack(lambda r: MoEBlock(cfg, r), groups, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg, rngs)
        if not cfg.tie_embeddings:
            self.head_dv = param(rngs, nnx.initializers.normal(cfg.init_std),
                                 (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype)

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
                 segment_ids_bt: jax.Array | None = None, *, routing_mask_bt: jax.Array | None = None,
                 return_aux: bool = False) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Logits [B, T, V]; with ``return_aux`` also the MoE auxiliaries (empty for a dense model):
        ``loss`` (the weighted aux + z losses to add to the training loss) and, per MoE layer,
        ``aux_loss``, ``z_loss``, ``dropped_frac`` [L_moe] and ``expert_load`` [L_moe, E].
        ``routing_mask_bt`` (True = route) keeps padding out of the experts and their statistics."""
        cfg = self.cfg
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask_bts = causal_mask(segment_ids_bt, b, t)
        x_btd = self.embed(tokens_bt)
        if cfg.position == "learned":
            x_btd = x_btd + self.positions(positions_bt).astype(x_btd.dtype)

        def layer_fn(stacked_module: nnx.Module):
            """(fn(x, layer_state) -> (x, MoE metrics or None), the stacked parameters)."""
            graphdef, stacked = nnx.split(stacked_module)

            def fn(x_btd, layer_state):
                block = nnx.merge(graphdef, layer_state)
                if isinstance(block, MoEBlock):
                    return block(x_btd, positions_bt, mask_bts, routing_mask_bt)
                return block(x_btd, positions_bt, mask_bts), None

            if cfg.remat != "none":
                fn = jax.checkpoint(fn, policy=REMAT_POLICIES[cfg.remat])
            return fn, stacked

        if cfg.num_dense_first:
            dense_fn, stacked = layer_fn(self.blocks)
            x_btd, _ = run_stack(dense_fn, x_btd, stacked, cfg.num_dense_first, cfg.scan_layers)
        aux: dict[str, jax.Array] = {}
        if cfg.num_moe_layers:
            groups, per_group = cfg.num_moe_layers, cfg.moe_every - 1
            moe_fn, moe_stacked = layer_fn(self.moe_blocks)
            group_stacked = None
            if per_group:
                group_fn, group_stacked = layer_fn(self.group_blocks)
                group_stacked = jax.tree.map(lambda a: a.reshape((groups, per_group) + a.shape[1:]),
                                             group_stacked)

            def moe_group_fn(x_btd, state):
                dense_state, moe_state = state
                if dense_state is not None:
                    x_btd, _ = run_stack(group_fn, x_btd, dense_state, per_group, cfg.scan_layers)
                return moe_fn(x_btd, moe_state)

            x_btd, aux = run_stack(moe_group_fn, x_btd, (group_stacked, moe_stacked), groups,
                                   cfg.scan_layers)
            aux["loss"] = (cfg.aux_loss_coef * jnp.mean(aux["aux_loss"]) +
                           cfg.z_loss_coef * jnp.mean(aux["z_loss"]))

        x_btd = self.final_norm(x_btd)
        if cfg.tie_embeddings:
            logits_btv = self.embed.attend(x_btd)
        else:
            logits_btv = jnp.einsum("btd,dv->btv", x_btd, self.head_dv[...].astype(x_btd.dtype))
        logits_btv = constrain(logits_btv.astype(jnp.float32), ("batch", "length", "vocab"))
        return (logits_btv, aux) if return_aux else logits_btv
