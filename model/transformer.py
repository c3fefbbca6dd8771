"""The decoder: pre-norm blocks (RMSNorm -> attention, RMSNorm -> MLP or MoE) stacked on a leading
``layers`` axis and run by ``jax.lax.scan`` (compile time flat in depth) or unrolled, then a final
norm and a tied or untied LM head.

Decoding threads a key/value cache through the same stacks: ``{stack name: (k_lbskh, v_lbskh)}``
with one [B, S, K, H] slab per layer of that stack (see ``init_cache``).

Stacks: ``blocks`` holds the first dense layers (all layers of a dense model); an MoE model then
scans over groups of ``moe_every`` layers: ``group_blocks`` (moe_every - 1 dense blocks per group,
stored flat) followed by one of ``moe_blocks``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import Attention, KVCache, causal_mask, decode_mask
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

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array,
                 cache: KVCache | None = None, layer: jax.Array | int = 0, *, decode: bool = False,
                 return_probs: bool = False) -> tuple:
        """(x, cache), plus the attention weights [B, N, T, S] with ``return_probs``."""
        y_btd, cache, *probs = self.attn(self.attn_norm(x_btd), positions_bt, mask_bts, cache, layer,
                                         decode=decode, return_probs=return_probs)
        x_btd = x_btd + y_btd
        x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
        return (constrain(x_btd, ("batch", "length", "embed")), cache, *probs)


class MoEBlock(nnx.Module):
    """x + attn(norm(x)), then x + moe(norm(x)); also returns the MoE layer's metrics."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.moe = MoE(cfg, rngs)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array,
                 routing_mask_bt: jax.Array | None, cache: KVCache | None = None,
                 layer: jax.Array | int = 0, *, decode: bool = False, return_probs: bool = False,
                 return_routing: bool = False) -> tuple:
        """(x, metrics, cache), plus the attention weights [B, N, T, S] with ``return_probs``;
        ``return_routing`` adds the routing to the metrics (see ``MoE``)."""
        y_btd, cache, *probs = self.attn(self.attn_norm(x_btd), positions_bt, mask_bts, cache, layer,
                                         decode=decode, return_probs=return_probs)
        x_btd = x_btd + y_btd
        y_btd, metrics = self.moe(self.mlp_norm(x_btd), routing_mask_bt, return_routing=return_routing)
        return (constrain(x_btd + y_btd, ("batch", "length", "embed")), metrics, cache, *probs)


def stack(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """``count`` modules made by ``make(rngs)``, their parameters stacked on a leading ``layers`` axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_stack(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    return make_stack(rngs)


def run_stack(fn: Callable, carry: Any, stacked: Any, count: int, scan: bool) -> tuple[Any, Any]:
    """Applies ``fn(carry, layer_state) -> (carry, out)`` to each of ``count`` stacked layers in
    turn; returns the carry and the outputs stacked on a leading axis."""
    if scan:
        return jax.lax.scan(fn, carry, stacked)
    outs = []
    for i in range(count):
        carry, out = fn(carry, jax.tree.map(lambda a, i=i: a[i], stacked))
        outs.append(out)
    return carry, jax.tree.map(lambda *o: jnp.stack(o), *outs)


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
                 return_aux: bool = False, return_attention: bool = False,
                 return_routing: bool = False,
                 return_features: bool = False) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Logits [B, T, V]; with ``return_aux`` also the MoE auxiliaries (empty for a dense model):
        ``loss`` (the weighted aux + z losses to add to the training loss) and, per MoE layer,
        ``aux_loss``, ``z_loss``, ``dropped_frac`` [L_moe] and ``expert_load`` [L_moe, E].
        ``routing_mask_bt`` (True = route) keeps padding out of the experts and their statistics.

        For inspection (off by default; each implies ``return_aux``): ``return_attention`` adds
        ``attention_probs`` [L, B, N, T, T] (every layer, in depth order, float32);
        ``return_routing`` adds, per MoE layer, ``routing_experts`` [L_moe, B, T, R] (each token's
        top-k experts, best first) and ``routing_weights`` [L_moe, B, T, R] (the weights applied).
        ``return_features``: the final-norm features [B, T, D] in place of the logits (for a loss
        that applies the head itself, model/loss.py)."""
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask_bts = causal_mask(segment_ids_bt, b, t)
        logits_btv, aux, _ = self._forward(tokens_bt, positions_bt, mask_bts, routing_mask_bt, None,
                                           decode=False, attention=return_attention,
                                           routing=return_routing, features=return_features)
        return (logits_btv, aux) if return_aux or return_attention or return_routing else logits_btv

    def with_cache(self, tokens_bt: jax.Array, positions_bt: jax.Array, cache: Cache, *,
                   decode: bool, routing_mask_bt: jax.Array | None = None) -> tuple[jax.Array, Cache]:
        """(logits [B, T, V], updated cache). A prefill (``decode=False``) runs a prompt batch whose
        row b sits at positions 0..T-1 and fills cache slots [0, T); a decode step (``decode=True``,
        T = 1) runs each row's next token at its own position, attending to the cached slots."""
        if decode:
            if tokens_bt.shape[1] != 1:
                raise ValueError(f"a decode step takes one token per row, got {tokens_bt.shape[1]}")
            mask_bts = decode_mask(positions_bt, cache_length(cache))
        else:
            mask_bts = causal_mask(None, *tokens_bt.shape)
        logits_btv, _, cache = self._forward(tokens_bt, positions_bt, mask_bts, routing_mask_bt, cache,
                                             decode=decode)
        return logits_btv, cache

    def _forward(self, tokens_bt: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array,
                 routing_mask_bt: jax.Array | None, cache: Cache | None, *, decode: bool,
                 attention: bool = False, routing: bool = False, features: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array], Cache | None]:
        cfg = self.cfg
        cache = cache or {}
        new_cache: Cache = {}
        x_btd = self.embed(tokens_bt)
        if cfg.position == "learned":
            x_btd = x_btd + self.positions(positions_bt).astype(x_btd.dtype)

        def layer_fn(stacked_module: nnx.Module):
            """(fn((x, stack cache), (layer_state, layer index)) -> ((x, stack cache), MoE metrics
            or None), the stacked parameters). The cache of the whole stack rides in the carry.
            With ``attention`` the outputs are dicts that also hold ``attention_probs``."""
            graphdef, stacked = nnx.split(stacked_module)

            def fn(carry, state_and_layer):
                x_btd, stack_cache = carry
                layer_state, layer = state_and_layer
                block = nnx.merge(graphdef, layer_state)
                if isinstance(block, MoEBlock):
                    x_btd, metrics, stack_cache, *probs = block(
                        x_btd, positions_bt, mask_bts, routing_mask_bt, stack_cache, layer,
                        decode=decode, return_probs=attention, return_routing=routing)
                    return (x_btd, stack_cache), metrics | ({"attention_probs": probs[0]} if probs else {})
                x_btd, stack_cache, *probs = block(x_btd, positions_bt, mask_bts, stack_cache, layer,
                                                   decode=decode, return_probs=attention)
                return (x_btd, stack_cache), {"attention_probs": probs[0]} if attention else None

            if cfg.remat != "none":
                fn = jax.checkpoint(fn, policy=REMAT_POLICIES[cfg.remat])
            return fn, stacked

        def layers(count: int) -> jax.Array:
            return jnp.arange(count, dtype=jnp.int32)

        probs_by_stack: list[jax.Array] = []  # [layers, B, N, T, S] each, in depth order
        if cfg.num_dense_first:
            dense_fn, stacked = layer_fn(self.blocks)
            n = cfg.num_dense_first
            (x_btd, new_cache["blocks"]), dense_out = run_stack(
                dense_fn, (x_btd, cache.get("blocks")), (stacked, layers(n)), n, cfg.scan_layers)
            if attention:
                probs_by_stack.append(dense_out["attention_probs"])
        aux: dict[str, jax.Array] = {}
        if cfg.num_moe_layers:
            groups, per_group = cfg.num_moe_layers, cfg.moe_every - 1
            moe_fn, moe_stacked = layer_fn(self.moe_blocks)
            group_stacked = group_layers = None
            if per_group:
                group_fn, group_stacked = layer_fn(self.group_blocks)
                by_group = functools.partial(_split_leading, groups=groups, per_group=per_group)
                group_stacked = jax.tree.map(by_group, group_stacked)
                group_layers = by_group(layers(groups * per_group))

            def moe_group_fn(carry, state):
                x_btd, group_cache, moe_cache = carry
                (dense_state, dense_layers), moe_state_and_layer = state
                if dense_state is not None:
                    (x_btd, group_cache), group_out = run_stack(group_fn, (x_btd, group_cache),
                                                                (dense_state, dense_layers), per_group,
                                                                cfg.scan_layers)
                (x_btd, moe_cache), metrics = moe_fn((x_btd, moe_cache), moe_state_and_layer)
                if attention:  # this group's layers in depth order: its dense blocks, then the MoE one
                    moe_probs = metrics.pop("attention_probs")[None]
                    metrics["attention_probs"] = moe_probs if dense_state is None else \
                        jnp.concatenate([group_out["attention_probs"], moe_probs])
                return (x_btd, group_cache, moe_cache), metrics

            (x_btd, new_cache["group_blocks"], new_cache["moe_blocks"]), aux = run_stack(
                moe_group_fn, (x_btd, cache.get("group_blocks"), cache.get("moe_blocks")),
                ((group_stacked, group_layers), (moe_stacked, layers(groups))), groups, cfg.scan_layers)
            aux["loss"] = (cfg.aux_loss_coef * jnp.mean(aux["aux_loss"]) +
                           cfg.z_loss_coef * jnp.mean(aux["z_loss"]))
            if attention:  # [groups, moe_every, ...] -> [groups * moe_every, ...]
                group_probs = aux.pop("attention_probs")
                probs_by_stack.append(group_probs.reshape((-1,) + group_probs.shape[2:]))
        if attention:
            aux["attention_probs"] = jnp.concatenate(probs_by_stack)

        x_btd = self.final_norm(x_btd)
        if features:
            return x_btd, aux, None
        if cfg.tie_embeddings:
            logits_btv = self.embed.attend(x_btd)
        else:
            logits_btv = jnp.einsum("btd,dv->btv", x_btd, self.head_dv[...].astype(x_btd.dtype))
        logits_btv = constrain(logits_btv.astype(jnp.float32), ("batch", "length", "vocab"))
        new_cache = {name: c for name, c in new_cache.items() if c is not None}
        return logits_btv, aux, new_cache or None


# ------------------------------------------------------------------------------------ the KV cache

Cache = dict[str, tuple[jax.Array, jax.Array]]  # stack name -> (k_lbskh, v_lbskh)


def _split_leading(a: jax.Array, *, groups: int, per_group: int) -> jax.Array:
    return a.reshape((groups, per_group) + a.shape[1:])


def cache_layers(cfg: ModelConfig) -> dict[str, int]:
    """Layers per stack, for the stacks this config has."""
    counts = {"blocks": cfg.num_dense_first, "group_blocks": cfg.num_moe_layers * (cfg.moe_every - 1),
              "moe_blocks": cfg.num_moe_layers}
    return {name: n for name, n in counts.items() if n}


def cache_shapes(cfg: ModelConfig, batch: int, length: int) -> Cache:
    """Abstract cache (``jax.ShapeDtypeStruct`` leaves) of ``length`` slots for ``batch`` rows, in the
    compute dtype."""
    dt = jnp.dtype(cfg.dtype)
    return {name: tuple(jax.ShapeDtypeStruct((n, batch, length, cfg.num_kv_heads,
                                              cfg.resolved_head_dim), dt) for _ in range(2))
            for name, n in cache_layers(cfg).items()}


def cache_length(cache: Cache) -> int:
    return next(iter(cache.values()))[0].shape[2]
