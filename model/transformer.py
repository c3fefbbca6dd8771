"""The decoder: pre-norm blocks (RMSNorm -> attention, RMSNorm -> MLP or MoE) stacked on a leading
``layers`` axis and run by ``jax.lax.scan`` (compile time flat in depth) or unrolled, then a final
norm and a tied or untied LM head (``model/loss.py: lm_logits``).

Decoding threads a key/value cache through the same stacks: ``{stack name: (k_lbskh, v_lbskh)}``
with one [B, S, K, H] slab per layer of that stack (see ``cache_shapes``), or, for serving, a paged
cache of [P, BS, K, H] blocks per layer shared out by block tables (``with_paged_cache``,
``paged_cache_shapes``, model/paged_attention.py).

Stacks: ``blocks`` holds the first dense layers (all layers of a dense model); an MoE model then
scans over groups of ``moe_every`` layers: ``group_blocks`` (moe_every - 1 dense blocks per group,
stored flat) followed by one of ``moe_blocks``. With ``mtp_depth``, ``mtp`` stacks the multi-token
prediction modules (model/mtp.py), which only training runs (``mtp_losses``).

Inspection: what any layer sows as an ``nnx.Intermediate`` (attention weights, MoE routing; see
``Attention`` and ``MoE``, switched on with ``set_attributes(sow_intermediates=True)``) is collected
layer by layer through the scan and sown again by the Transformer with a leading axis over the
layers that sowed it, in depth order: ``nnx.capture(model, nnx.Intermediate)(tokens)`` returns
``(logits, intermediates)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.attention import Attention, KVCache, Span
from model.config import ModelConfig
from model.layers import MLP, Embed, LearnedPositions, RMSNorm
from model.loss import head_nll_sum, lm_logits
from model.mla import MLAttention
from model.moe import MoE
from model.mtp import MTPModule, depth_batch
from model.primitives import param
from sharding.constrain import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

Cache = dict[str, tuple[jax.Array, jax.Array]]  # stack name -> (k_lbskh, v_lbskh) or (k_lpbkh, ...)
PAGED_MLA_ERROR = ("the paged KV cache does not support attention_type=mla yet (its latent cache); "
                   "use the static-batch Generator")
Sown = dict[str, jax.Array]  # intermediate name -> values stacked over the layers that sowed it


class Block(nnx.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)): the ffn is a dense MLP (``mlp``) or, with ``moe``,
    routed experts (``moe``), which also give the layer's metrics. With ``post_norms`` (Gemma's
    sandwich norms) each branch's output is normed again (``attn_post_norm``, ``mlp_post_norm``)
    before the residual add."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, moe: bool = False):
        self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.attn = MLAttention(cfg, rngs) if cfg.attention_type == "mla" else Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg, rngs)
        if moe:
            self.moe = MoE(cfg, rngs)
        else:
            self.mlp = MLP(cfg, rngs)
        if cfg.post_norms:
            self.attn_post_norm = RMSNorm(cfg.d_model, cfg, rngs)
            self.mlp_post_norm = RMSNorm(cfg.d_model, cfg, rngs)

    def __call__(self, x_btd: jax.Array, span: Span, routing_mask_bt: jax.Array | None,
                 cache: KVCache | None = None, layer: jax.Array | int = 0,
                 local: bool | jax.Array = False) -> tuple[jax.Array, Any, dict]:
        """(x, the stack's cache, this layer's MoE metrics or {} for a dense layer); ``local``: the
        layer attends within the sliding window."""
        y_btd, cache = self.attn(self.attn_norm(x_btd), span, cache, layer, local)
        if hasattr(self, "attn_post_norm"):
            y_btd = self.attn_post_norm(y_btd)
        x_btd = x_btd + y_btd
        if hasattr(self, "moe"):
            y_btd, metrics = self.moe(self.mlp_norm(x_btd), routing_mask_bt)
        else:
            y_btd, metrics = self.mlp(self.mlp_norm(x_btd)), {}
        if hasattr(self, "mlp_post_norm"):
            y_btd = self.mlp_post_norm(y_btd)
        return constrain(x_btd + y_btd, ("batch", "length", "embed")), cache, metrics


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


def sown_arrays(sown: nnx.State) -> Sown:
    """{name: value} of what one call of a block sowed (each name sown once per call)."""
    out: Sown = {}
    for path, variable in nnx.to_flat_state(sown):
        name = str(path[-1])
        if name in out:
            raise ValueError(f"two layers of one block sow an intermediate named {name!r}")
        out[name] = variable.get_value()[0]
    return out


def in_depth_order(*parts: Sown) -> Sown:
    """The parts' arrays (each [layers, ...], parts in depth order) concatenated by name."""
    names = dict.fromkeys(name for part in parts for name in part)
    return {name: jnp.concatenate([part[name] for part in parts if name in part]) for name in names}


class _Layers:
    """How one forward pass runs a stacked module: the per-layer function for ``run_stack`` (each
    layer merged from its slice of the stack, its sown intermediates captured) and its inputs."""

    def __init__(self, cfg: ModelConfig, span: Span, routing_mask_bt: jax.Array | None):
        self.cfg, self.span, self.routing_mask_bt = cfg, span, routing_mask_bt

    def fn(self, stacked_module: nnx.Module, local_l: np.ndarray) -> tuple[Callable, Any]:
        """(fn((x, stack cache), (layer state, (layer index, local))) -> ((x, stack cache), (MoE
        metrics, sown intermediates)), the stacked layer states). ``local_l``: which of the stack's
        layers are local; when they all agree, that is a constant of the trace, not a scanned
        value (kernels then fix their window at trace time)."""
        graphdef, stacked = nnx.split(stacked_module)
        uniform = bool(local_l[0]) if len(set(local_l.tolist())) == 1 else None

        def fn(carry: tuple, state_and_layer: tuple) -> tuple[tuple, tuple[dict, Sown]]:
            x_btd, stack_cache = carry
            layer_state, (layer, local) = state_and_layer
            block = nnx.capture(nnx.merge(graphdef, layer_state), nnx.Intermediate)
            (x_btd, stack_cache, metrics), sown = block(
                x_btd, self.span, self.routing_mask_bt, stack_cache, layer,
                local if uniform is None else uniform)
            return (x_btd, stack_cache), (metrics, sown_arrays(sown))

        if self.cfg.remat != "none":
            fn = jax.checkpoint(fn, policy=REMAT_POLICIES[self.cfg.remat])
        return fn, stacked


def _layer_indices(count: int) -> jax.Array:
    return jnp.arange(count, dtype=jnp.int32)


def stack_depths(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The depth (0-based) of each layer of each stack, in stack order."""
    first, every, groups = cfg.num_dense_first, cfg.moe_every, cfg.num_moe_layers
    return {"blocks": np.arange(first),
            "group_blocks": np.array([first + g * every + j for g in range(groups)
                                      for j in range(every - 1)], dtype=np.int64),
            "moe_blocks": np.array(cfg.moe_layer_indices, dtype=np.int64)}


def stack_locals(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Which layers of each stack attend within the sliding window."""
    return {name: np.array([cfg.is_local_layer(int(d)) for d in depths], dtype=bool)
            for name, depths in stack_depths(cfg).items()}


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
            self.moe_blocks = stack(lambda r: Block(cfg, r, moe=True), groups, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg, rngs)
        if not cfg.tie_embeddings:
            self.head_dv = param(rngs, nnx.initializers.normal(cfg.init_std),
                                 (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype)
        if cfg.mtp_depth:  # made last: the main model's parameters do not depend on it
            self.mtp = stack(lambda r: MTPModule(cfg, r, Block(cfg, r, moe=cfg.is_moe)),
                             cfg.mtp_depth, rngs)

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
                 segment_ids_bt: jax.Array | None = None, *,
                 routing_mask_bt: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] (float32) of the next token at every position (see ``hidden``)."""
        x_btd, _ = self.hidden(tokens_bt, positions_bt, segment_ids_bt, routing_mask_bt=routing_mask_bt)
        return lm_logits(x_btd, self.head_weight_vd(), self.cfg.final_logit_softcap)

    def hidden(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None, *,
               routing_mask_bt: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(final-norm features [B, T, D], MoE auxiliaries): the auxiliaries are empty for a dense
        model, else ``loss`` (the weighted aux + z losses to add to the training loss) and, per MoE
        layer, ``aux_loss``, ``z_loss``, ``dropped_frac`` [L_moe] and ``expert_load`` [L_moe, E].
        ``positions_bt`` default to 0..T-1; ``segment_ids_bt`` keep packed documents apart;
        ``routing_mask_bt`` (True = route) keeps padding out of the experts and their statistics."""
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        layers = _Layers(self.cfg, Span(positions_bt, segment_ids_bt), routing_mask_bt)
        x_btd, aux, _ = self._forward(tokens_bt, layers, {})
        return x_btd, aux

    def head_weight_vd(self) -> jax.Array:
        """The LM head as [V, D] in the compute dtype: the tied embedding table or the untied head."""
        dt = self.embed.dtype
        if self.cfg.tie_embeddings:
            return self.embed.table_vd[...].astype(dt)
        return self.head_dv[...].astype(dt).T

    def mtp_losses(self, h_btd: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Multi-token prediction (model/mtp.py) on a training batch (as ``nll_sums`` takes it),
        from the main model's final-norm features ``h_btd``: ``mtp_loss_per_depth`` [D] (each
        depth's mean cross-entropy over the positions whose target exists), ``mtp_loss`` (their
        mean), ``loss`` (mtp_loss_weight * mtp_loss, plus the MTP MoE blocks' router losses) and,
        for MoE blocks, their metrics prefixed ``mtp_`` ([D] or [D, E]), apart from the main
        layers'. Depths run in turn (scanned with ``scan_layers``), each remat like a layer."""
        cfg = self.cfg
        b, t = batch["inputs"].shape
        positions_bt = batch.get("positions")
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        span, w_vd = Span(positions_bt, batch.get("segment_ids")), self.head_weight_vd()
        graphdef, stacked = nnx.split(self.mtp)
        depths = [depth_batch(batch, k) for k in range(1, cfg.mtp_depth + 1)]

        def depth(h_btd: jax.Array, state_and_batch: tuple) -> tuple[jax.Array, tuple]:
            state, (tokens_bt, targets_bt, weights_bt) = state_and_batch
            h_btd, x_btd, metrics = nnx.merge(graphdef, state)(h_btd, self.embed(tokens_bt), span,
                                                              weights_bt > 0)
            nll_sum = head_nll_sum(x_btd, w_vd, targets_bt, weights_bt, cfg.loss_chunk,
                                   cfg.final_logit_softcap)
            return h_btd, (nll_sum, jnp.sum(weights_bt), metrics)

        if cfg.remat != "none":
            depth = jax.checkpoint(depth, policy=REMAT_POLICIES[cfg.remat])
        _, (nll_k, weight_k, metrics) = run_stack(
            depth, h_btd, (stacked, jax.tree.map(lambda *a: jnp.stack(a), *depths)), cfg.mtp_depth,
            cfg.scan_layers)
        loss_k = nll_k / jnp.maximum(weight_k, 1.0)
        out = {"mtp_loss": jnp.mean(loss_k), "mtp_loss_per_depth": loss_k}
        loss = cfg.mtp_loss_weight * out["mtp_loss"]
        if metrics:
            loss = loss + router_loss(cfg, metrics)
            out |= {f"mtp_{name}": value for name, value in metrics.items()}
        return out | {"loss": loss}

    def with_cache(self, tokens_bt: jax.Array, positions_bt: jax.Array, cache: Cache, *,
                   decode: bool, routing_mask_bt: jax.Array | None = None,
                   lengths_b: jax.Array | None = None) -> tuple[jax.Array, Cache]:
        """(logits [B, T, V], updated cache). A prefill (``decode=False``) runs a prompt batch whose
        row b sits at positions 0..T-1, right-padded after ``lengths_b[b]`` tokens (default: none),
        and fills the cache (model/attention.py: update_cache); a decode step (``decode=True``,
        T = 1) runs each row's next token at its own position, attending to the cached slots."""
        if decode and tokens_bt.shape[1] != 1:
            raise ValueError(f"a decode step takes one token per row, got {tokens_bt.shape[1]}")
        layers = _Layers(self.cfg, Span(positions_bt, lengths_b=lengths_b, decode=decode),
                         routing_mask_bt)
        x_btd, _, cache = self._forward(tokens_bt, layers, cache)
        return lm_logits(x_btd, self.head_weight_vd(), self.cfg.final_logit_softcap), cache

    def with_paged_cache(self, tokens_bt: jax.Array, positions_bt: jax.Array, lengths_b: jax.Array,
                         block_table_bm: jax.Array, cache: Cache, *,
                         routing_mask_bt: jax.Array | None = None) -> tuple[jax.Array, Cache]:
        """(logits [B, T, V], updated paged cache): the first ``lengths_b[b]`` of row b's T tokens
        run at ``positions_bt`` (a prefill chunk, or T = 1 for a decode step); their keys and
        values go to the row's blocks in ``block_table_bm`` [B, M] and each attends over the row's
        positions at or before its own (model/paged_attention.py). The other tokens are padding:
        they write to the scratch block and their logits mean nothing (give them a position below
        ``max_seq_len``, e.g. 0: a learned position table has nothing beyond)."""
        if self.cfg.attention_type == "mla":
            raise ValueError(PAGED_MLA_ERROR)
        span = Span(positions_bt, lengths_b=lengths_b, block_table_bm=block_table_bm)
        x_btd, _, cache = self._forward(tokens_bt, _Layers(self.cfg, span, routing_mask_bt), cache)
        return lm_logits(x_btd, self.head_weight_vd(), self.cfg.final_logit_softcap), cache

    # ------------------------------------------------------------------------------ the stacks

    def _forward(self, tokens_bt: jax.Array, layers: _Layers,
                 cache: Cache) -> tuple[jax.Array, dict[str, jax.Array], Cache | None]:
        """(final-norm features, MoE auxiliaries, updated cache or None): every stack in depth
        order; what the layers sowed is sown again here, stacked over layers."""
        cfg = self.cfg
        x_btd = self.embed(tokens_bt)
        if cfg.position == "learned":
            x_btd = x_btd + self.positions(layers.span.positions_bt).astype(x_btd.dtype)
        new_cache: dict[str, Any] = {}
        sown_parts: list[Sown] = []
        if cfg.num_dense_first:
            local_l = stack_locals(cfg)["blocks"]
            fn, stacked = layers.fn(self.blocks, local_l)
            n = cfg.num_dense_first
            (x_btd, new_cache["blocks"]), (_, sown) = run_stack(
                fn, (x_btd, cache.get("blocks")), (stacked, (_layer_indices(n), jnp.asarray(local_l))),
                n, cfg.scan_layers)
            sown_parts.append(sown)
        aux: dict[str, jax.Array] = {}
        if cfg.num_moe_layers:
            x_btd, group_cache, moe_cache, aux, sown = self._moe_groups(x_btd, layers, cache)
            new_cache |= {"group_blocks": group_cache, "moe_blocks": moe_cache}
            sown_parts.append(sown)
        for name, value in in_depth_order(*sown_parts).items():
            self.sow(nnx.Intermediate, name, value)
        new_cache = {name: c for name, c in new_cache.items() if c is not None}
        return self.final_norm(x_btd), aux, new_cache or None

    def _moe_groups(self, x_btd: jax.Array, layers: _Layers, cache: Cache) -> tuple:
        """(x, group_blocks cache, moe_blocks cache, MoE auxiliaries, sown intermediates): the
        groups of ``moe_every`` layers, scanned over groups (each: its dense blocks, then its MoE
        block)."""
        cfg = self.cfg
        groups, per_group = cfg.num_moe_layers, cfg.moe_every - 1
        locals_ = stack_locals(cfg)
        moe_fn, moe_stacked = layers.fn(self.moe_blocks, locals_["moe_blocks"])
        group_stacked = group_layers = None
        if per_group:
            group_fn, group_stacked = layers.fn(self.group_blocks, locals_["group_blocks"])
            by_group = functools.partial(_split_leading, groups=groups, per_group=per_group)
            group_stacked = jax.tree.map(by_group, group_stacked)
            group_layers = (by_group(_layer_indices(groups * per_group)),
                            by_group(jnp.asarray(locals_["group_blocks"])))

        def group(carry: tuple, xs: tuple) -> tuple[tuple, tuple[dict, Sown]]:
            x_btd, group_cache, moe_cache = carry
            (dense_state, dense_layers), moe_state_and_layer = xs
            dense_sown: Sown = {}
            if dense_state is not None:
                (x_btd, group_cache), (_, dense_sown) = run_stack(
                    group_fn, (x_btd, group_cache), (dense_state, dense_layers), per_group,
                    cfg.scan_layers)
            (x_btd, moe_cache), (metrics, moe_sown) = moe_fn((x_btd, moe_cache), moe_state_and_layer)
            moe_sown = {name: value[None] for name, value in moe_sown.items()}
            return (x_btd, group_cache, moe_cache), (metrics, in_depth_order(dense_sown, moe_sown))

        (x_btd, group_cache, moe_cache), (aux, sown) = run_stack(
            group, (x_btd, cache.get("group_blocks"), cache.get("moe_blocks")),
            ((group_stacked, group_layers),
             (moe_stacked, (_layer_indices(groups), jnp.asarray(locals_["moe_blocks"])))), groups,
            cfg.scan_layers)
        aux["loss"] = router_loss(cfg, aux)
        sown = {name: value.reshape((-1,) + value.shape[2:]) for name, value in sown.items()}
        return x_btd, group_cache, moe_cache, aux, sown


def router_loss(cfg: ModelConfig, metrics: dict[str, jax.Array]) -> jax.Array:
    """The weighted router losses to add to the training loss, each averaged over the MoE layers
    whose ``metrics`` (stacked per layer) are given."""
    return (cfg.aux_loss_coef * jnp.mean(metrics["aux_loss"]) +
            cfg.z_loss_coef * jnp.mean(metrics["z_loss"]) +
            cfg.seq_aux_loss_coef * jnp.mean(metrics["seq_aux_loss"]))


# ------------------------------------------------------------------------------------ the KV cache


def _split_leading(a: jax.Array, *, groups: int, per_group: int) -> jax.Array:
    return a.reshape((groups, per_group) + a.shape[1:])


def cache_layers(cfg: ModelConfig) -> dict[str, int]:
    """Layers per stack, for the stacks this config has."""
    counts = {"blocks": cfg.num_dense_first, "group_blocks": cfg.num_moe_layers * (cfg.moe_every - 1),
              "moe_blocks": cfg.num_moe_layers}
    return {name: n for name, n in counts.items() if n}


def cache_slots(cfg: ModelConfig, length: int) -> int:
    """Slots a cache for a context of ``length`` tokens holds: ``length``, or the sliding window
    when every layer is local (a rolling cache: position p in slot p % window)."""
    if cfg.sliding_window and all(cfg.is_local_layer(d) for d in range(cfg.num_layers)):
        return min(length, cfg.sliding_window)
    return length


def cache_shapes(cfg: ModelConfig, batch: int, length: int) -> Cache:
    """Abstract cache (``jax.ShapeDtypeStruct`` leaves) for a context of ``length`` tokens
    (``cache_slots`` slots) for ``batch`` rows, in the compute dtype: keys and values [L, B, S, K,
    H]; with MLA the latent [L, B, S, 1, kv_lora_rank] and the roped key [L, B, S, 1, qk_rope]."""
    dt = jnp.dtype(cfg.dtype)
    slots = cache_slots(cfg, length)
    if cfg.attention_type == "mla":
        widths = ((1, cfg.kv_lora_rank), (1, cfg.qk_rope_head_dim))
    else:
        widths = ((cfg.num_kv_heads, cfg.resolved_head_dim),) * 2
    return {name: tuple(jax.ShapeDtypeStruct((n, batch, slots, *w), dt) for w in widths)
            for name, n in cache_layers(cfg).items()}


def paged_cache_shapes(cfg: ModelConfig, num_blocks: int, block_size: int) -> Cache:
    """Abstract paged cache (``jax.ShapeDtypeStruct`` leaves) of ``num_blocks`` blocks of
    ``block_size`` slots per layer, in the compute dtype: keys and values [L, P, BS, K, H]
    (logical axes ``model/paged_attention.py: PAGED_CACHE_AXES``). Block 0 is scratch."""
    if cfg.attention_type == "mla":
        raise ValueError(PAGED_MLA_ERROR)
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.resolved_head_dim)
    return {name: tuple(jax.ShapeDtypeStruct((n, *shape), jnp.dtype(cfg.dtype)) for _ in "kv")
            for name, n in cache_layers(cfg).items()}
