"""Mixture-of-Experts feed-forward layer: a float32 router with top-k gates, the Switch load-balancing
and router z auxiliaries, a capacity path (fixed [E, C] buffers, exchanged between expert shards by
all-to-all) and a dropless path (assignments sorted by expert, three grouped matmuls: XLA's
``ragged_dot`` or, on TPU, the Pallas megablox kernel; see ``model/grouped_matmul.py``), and optional
shared experts. Logical axis names only: ``sharding/manual.py`` maps them onto the mesh.

Routing groups are batch rows: capacity, drops and priorities depend only on a row's own tokens, so
the result is the same on every mesh and for every microbatching.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.grouped_matmul import grouped_matmul, resolve_matmul
from model.layers import MLP
from model.lora import adapted_weight
from model.primitives import param
from sharding.constrain import constrain
from sharding.manual import Collectives, manual

# Per-row router statistics returned by the per-device kernels, summed over the batch afterwards.
STAT_NAMES = {"expert_tokens_be": ("batch", None), "prob_sum_be": ("batch", None),
              "z_sum_b": ("batch",), "tokens_b": ("batch",), "dropped_b": ("batch",)}
# With ``routing=True`` (the layer's ``sow_intermediates``) the kernels also return each token's
# chosen experts (best first) and the combine weights they applied (0 for a dropped or unrouted
# assignment).
ROUTING_NAMES = {"experts_btr": ("batch", None, None), "weights_btr": ("batch", None, None)}


def route(x_btd: jax.Array, w_router_de: jax.Array, k: int,
          mode: str) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(logits_bte, probs_bte, experts_btr, gates_btr): float32 router logits and softmax, each
    token's k best experts (best first) and their combine weights under ``mode``."""
    logits_bte = jnp.einsum("btd,de->bte", x_btd.astype(jnp.float32), w_router_de.astype(jnp.float32))
    probs_bte = jax.nn.softmax(logits_bte, axis=-1)
    top_logits_btr, experts_btr = jax.lax.top_k(logits_bte, k)
    if mode == "topk_softmax":
        gates_btr = jax.nn.softmax(top_logits_btr, axis=-1)
    else:
        gates_btr = jnp.take_along_axis(probs_bte, experts_btr, axis=-1)
        if mode == "softmax_topk":
            gates_btr = gates_btr / jnp.sum(gates_btr, axis=-1, keepdims=True)
    return logits_bte, probs_bte, experts_btr, gates_btr


def capacity_positions(experts_btr: jax.Array, mask_bt: jax.Array, num_experts: int,
                       capacity: int) -> tuple[jax.Array, jax.Array]:
    """(position_btr, kept_btr): each assignment's place in its expert's queue and whether it fits.

    An expert takes a row's assignments in token order (a token's choices best first) until it holds
    ``capacity``; later ones are dropped. A token's fate depends only on earlier tokens (causal).
    Masked tokens (padding) are not routed and take no place."""
    b, t, r = experts_btr.shape
    routed_bar = jnp.repeat(mask_bt, r, axis=1).astype(jnp.int32)  # A = T*R assignments, token-major
    onehot_bae = jax.nn.one_hot(experts_btr.reshape(b, t * r), num_experts,
                                dtype=jnp.int32) * routed_bar[..., None]
    position_bae = jnp.cumsum(onehot_bae, axis=1) - 1
    position_btr = jnp.sum(position_bae * onehot_bae, axis=-1).reshape(b, t, r)
    kept_btr = mask_bt[..., None] & (position_btr < capacity)
    return position_btr, kept_btr


def dispatch(x_btd: jax.Array, experts_btr: jax.Array, position_btr: jax.Array, kept_btr: jax.Array,
             num_experts: int, capacity: int) -> jax.Array:
    """[B, E, C, D] buffers: slot (e, c) of row b holds the token routed there (zeros if none)."""
    b, t, r = experts_btr.shape
    row_btr = jnp.broadcast_to(jnp.arange(b)[:, None, None], (b, t, r))
    token_btr = jnp.broadcast_to(jnp.arange(t)[None, :, None], (b, t, r))
    slot_btr = jnp.where(kept_btr, position_btr, capacity)  # capacity = out of range: not written
    source_bec = jnp.full((b, num_experts, capacity), t, jnp.int32).at[
        row_btr, experts_btr, slot_btr].set(token_btr, mode="drop")
    x_padded_btd = jnp.concatenate([x_btd, jnp.zeros_like(x_btd[:, :1])], axis=1)  # t = empty slot
    return x_padded_btd[jnp.arange(b)[:, None, None], source_bec]


def combine(y_becd: jax.Array, experts_btr: jax.Array, position_btr: jax.Array, kept_btr: jax.Array,
            gates_btr: jax.Array) -> jax.Array:
    """[B, T, D]: each token's kept expert outputs weighted by their gates."""
    b, t, r = experts_btr.shape
    row_btr = jnp.broadcast_to(jnp.arange(b)[:, None, None], (b, t, r))
    y_btrd = y_becd[row_btr, experts_btr, jnp.where(kept_btr, position_btr, 0)]
    weights_btr = jnp.where(kept_btr, gates_btr, 0.0).astype(y_becd.dtype)
    return jnp.einsum("btrd,btr->btd", y_btrd, weights_btr)


def expert_ffn(comm: Collectives, x_becd: jax.Array, w_up_edf: jax.Array, w_down_efd: jax.Array,
               w_gate_edf: jax.Array | None) -> jax.Array:
    """Every expert's MLP on its own buffer: SwiGLU when ``w_gate_edf`` is given, else GELU. Each
    expert's rows and slots form one [B*C, D] matrix (N = B*C): XLA:CPU's weight gradients run about
    twice as fast over one flat axis as over [B, C] (bench.train moe_medium_capacity)."""
    b, e, c, d = x_becd.shape
    x_end = x_becd.transpose(1, 0, 2, 3).reshape(e, b * c, d)
    up_enf = jnp.einsum("end,edf->enf", x_end, w_up_edf)
    if w_gate_edf is not None:
        h_enf = jax.nn.silu(jnp.einsum("end,edf->enf", x_end, w_gate_edf)) * up_enf
    else:
        h_enf = jax.nn.gelu(up_enf)
    y_end = comm.psum(jnp.einsum("enf,efd->end", h_enf, w_down_efd), "expert_mlp")
    return y_end.reshape(e, b, c, -1).transpose(1, 0, 2, 3)


def router_stats(logits_bte: jax.Array, probs_bte: jax.Array, experts_btr: jax.Array,
                 kept_btr: jax.Array, mask_bt: jax.Array) -> dict[str, jax.Array]:
    """Per-row sums over routed (unmasked) tokens: assignments per expert, router probabilities per
    expert, squared logsumexp of the logits, tokens, dropped assignments."""
    valid_bt = mask_bt.astype(jnp.float32)
    num_experts = logits_bte.shape[-1]
    onehot_btre = jax.nn.one_hot(experts_btr, num_experts, dtype=jnp.float32)
    lse_bt = jax.nn.logsumexp(logits_bte, axis=-1)
    dropped_btr = mask_bt[..., None] & ~kept_btr
    return {"expert_tokens_be": jnp.einsum("btre,bt->be", onehot_btre, valid_bt),
            "prob_sum_be": jnp.einsum("bte,bt->be", probs_bte, valid_bt),
            "z_sum_b": jnp.sum(lse_bt * lse_bt * valid_bt, axis=1),
            "tokens_b": jnp.sum(valid_bt, axis=1),
            "dropped_b": jnp.sum(dropped_btr.astype(jnp.float32), axis=(1, 2))}


def capacity_moe(comm: Collectives, x_btd: jax.Array, mask_bt: jax.Array, w_router_de: jax.Array,
                 w_up_edf: jax.Array, w_down_efd: jax.Array, *w_gate_edf: jax.Array, k: int,
                 mode: str, capacity: int, routing: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The capacity path on one device's rows. With experts sharded, buffers travel to the devices
    holding their experts and back by all-to-all ([B, E, C, D] -> [B * shards, E / shards, C, D])."""
    num_experts = w_router_de.shape[-1]
    logits_bte, probs_bte, experts_btr, gates_btr = route(x_btd, w_router_de, k, mode)
    position_btr, kept_btr = capacity_positions(experts_btr, mask_bt, num_experts, capacity)
    x_becd = dispatch(x_btd, experts_btr, position_btr, kept_btr, num_experts, capacity)
    x_becd = comm.all_to_all(x_becd, "experts", split_axis=1, concat_axis=0)
    y_becd = expert_ffn(comm, x_becd, w_up_edf, w_down_efd, w_gate_edf[0] if w_gate_edf else None)
    y_becd = comm.all_to_all(y_becd, "experts", split_axis=0, concat_axis=1)
    y_btd = combine(y_becd, experts_btr, position_btr, kept_btr, gates_btr)
    stats = router_stats(logits_bte, probs_bte, experts_btr, kept_btr, mask_bt)
    if routing:
        stats |= {"experts_btr": experts_btr, "weights_btr": jnp.where(kept_btr, gates_btr, 0.0)}
    return y_btd, stats


def dropless_moe(comm: Collectives, x_btd: jax.Array, mask_bt: jax.Array, w_router_de: jax.Array,
                 w_up_edf: jax.Array, w_down_efd: jax.Array, *w_gate_edf: jax.Array, k: int,
                 mode: str, matmul: str = "ragged_dot",
                 routing: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The dropless path on one device's rows with every expert's weights: the A = B*T*k
    assignments sorted by expert, grouped matmuls (``matmul``: ragged_dot or megablox, see
    ``grouped_matmul``), unsorted and combined. With ``expert_mlp`` sharded each device holds a
    slice of every expert's hidden units, and the down projection's partial sums are added up."""
    b, t, d = x_btd.shape
    num_experts = w_router_de.shape[-1]
    logits_bte, probs_bte, experts_btr, gates_btr = route(x_btd, w_router_de, k, mode)
    routed_btr = jnp.broadcast_to(mask_bt[..., None], experts_btr.shape)
    expert_a = jnp.where(routed_btr, experts_btr, num_experts).reshape(-1)  # unrouted sort last
    order_a = jnp.argsort(expert_a, stable=True)
    token_a = jnp.repeat(jnp.arange(b * t), k)[order_a]
    group_sizes_e = jnp.sum(jax.nn.one_hot(expert_a, num_experts, dtype=jnp.int32), axis=0)
    x_ad = x_btd.reshape(b * t, d)[token_a]
    up_af = grouped_matmul(x_ad, w_up_edf, group_sizes_e, matmul)
    if w_gate_edf:
        h_af = jax.nn.silu(grouped_matmul(x_ad, w_gate_edf[0], group_sizes_e, matmul)) * up_af
    else:
        h_af = jax.nn.gelu(up_af)
    y_ad = comm.psum(grouped_matmul(h_af, w_down_efd, group_sizes_e, matmul), "expert_mlp")
    y_ad = jnp.where((expert_a[order_a] < num_experts)[:, None], y_ad, 0)
    y_btrd = jnp.zeros_like(y_ad).at[order_a].set(y_ad).reshape(b, t, k, d)
    weights_btr = jnp.where(routed_btr, gates_btr, 0.0).astype(y_btrd.dtype)
    y_btd = jnp.einsum("btrd,btr->btd", y_btrd, weights_btr)
    stats = router_stats(logits_bte, probs_bte, experts_btr, routed_btr, mask_bt)
    if routing:
        stats |= {"experts_btr": experts_btr, "weights_btr": jnp.where(routed_btr, gates_btr, 0.0)}
    return y_btd, stats


def layer_metrics(stats: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """One MoE layer's auxiliaries from its router statistics summed over the batch.

    aux_loss = E * sum_e load_e * mean_prob_e (Switch; 1 when balanced), with load_e the fraction of
    the k * tokens assignments routed to expert e (before capacity) and mean_prob_e its mean router
    probability; z_loss = mean logsumexp(logits)^2; dropped_frac = dropped / assignments."""
    tokens = jnp.maximum(stats["tokens"], 1.0)
    load_e = stats["expert_tokens_e"] / (k * tokens)
    mean_prob_e = stats["prob_sum_e"] / tokens
    return {"aux_loss": load_e.shape[0] * jnp.sum(load_e * mean_prob_e),
            "z_loss": stats["z_sum"] / tokens,
            "dropped_frac": stats["dropped"] / (k * tokens),
            "expert_load": load_e}


class MoE(nnx.Module):
    """Routed experts (plus shared ones): x [B, T, D] -> (y [B, T, D], this layer's metrics).

    With ``sow_intermediates`` set it sows the intermediates ``routing_experts`` [B, T, R] (each
    token's top-k experts, best first) and ``routing_weights`` [B, T, R] (the combine weights
    applied); collect them with ``nnx.capture``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, d, f = cfg.num_experts, cfg.d_model, cfg.resolved_expert_mlp_dim
        init = nnx.initializers.normal(cfg.init_std)
        out_init = nnx.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        pd = cfg.param_dtype
        self.cfg = cfg
        self.w_router_de = param(rngs, init, (d, e), ("embed", "experts"), pd)
        if cfg.activation == "swiglu":
            self.w_gate_edf = param(rngs, init, (e, d, f), ("experts", "embed", "expert_mlp"), pd)
        self.w_up_edf = param(rngs, init, (e, d, f), ("experts", "embed", "expert_mlp"), pd)
        self.w_down_efd = param(rngs, out_init, (e, f, d), ("experts", "expert_mlp", "embed"), pd)
        if cfg.num_shared_experts:
            self.shared = MLP(dataclasses.replace(cfg, mlp_dim=cfg.num_shared_experts * f), rngs)
        self.sow_intermediates = False

    def __call__(self, x_btd: jax.Array,
                 mask_bt: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(y [B, T, D], this layer's metrics: see ``layer_metrics``); tokens where ``mask_bt`` is
        False (padding) are not routed."""
        cfg = self.cfg
        b, t, _ = x_btd.shape
        dt = jnp.dtype(cfg.dtype)
        routing = self.sow_intermediates
        mask_bt = jnp.ones((b, t), bool) if mask_bt is None else mask_bt.astype(bool)
        # Capacity: experts stay sharded and tokens travel; dropless: every device holds all experts.
        experts = "experts" if cfg.moe_impl == "capacity" else None
        args = [x_btd, mask_bt, self.w_router_de[...],
                adapted_weight(self, "up", self.w_up_edf[...]).astype(dt),
                adapted_weight(self, "down", self.w_down_efd[...]).astype(dt)]
        in_names = [("batch", None, None), ("batch", None), (None, None),
                    (experts, None, "expert_mlp"), (experts, "expert_mlp", None)]
        if cfg.activation == "swiglu":
            args.append(adapted_weight(self, "gate", self.w_gate_edf[...]).astype(dt))
            in_names.append((experts, None, "expert_mlp"))
        pallas = False
        if cfg.moe_impl == "capacity":
            kernel = functools.partial(capacity_moe, k=cfg.experts_per_token, mode=cfg.router_mode,
                                       capacity=cfg.expert_capacity(t), routing=routing)
        else:
            matmul = resolve_matmul(cfg.moe_matmul)
            pallas = matmul == "megablox"
            kernel = functools.partial(dropless_moe, k=cfg.experts_per_token, mode=cfg.router_mode,
                                       matmul=matmul, routing=routing)
        stat_names = STAT_NAMES | ROUTING_NAMES if routing else STAT_NAMES
        y_btd, stats = manual(kernel, args, in_names, (("batch", None, None), stat_names),
                              within={"experts": "batch"}, check_vma=not pallas)
        y_btd = constrain(y_btd, ("batch", "length", "embed"))
        if cfg.num_shared_experts:
            y_btd = y_btd + self.shared(x_btd)
        sums = {"expert_tokens_e": jnp.sum(stats["expert_tokens_be"], axis=0),
                "prob_sum_e": jnp.sum(stats["prob_sum_be"], axis=0),
                **{name[:-2]: jnp.sum(stats[name]) for name in ("z_sum_b", "tokens_b", "dropped_b")}}
        if routing:
            self.sow(nnx.Intermediate, "routing_experts", stats["experts_btr"])
            self.sow(nnx.Intermediate, "routing_weights", stats["weights_btr"])
        return y_btd, layer_metrics(sums, cfg.experts_per_token)
