"""Mixture-of-Experts feed-forward layer: a float32 router with top-k gates, the Switch load-balancing
and router z auxiliaries, a capacity path (fixed [E, C] buffers, exchanged between expert shards by
all-to-all) and a dropless path (assignments sorted by expert, three grouped matmuls: XLA's
``ragged_dot`` or, on TPU, the Pallas megablox kernel; see ``model/grouped_matmul.py``), and optional
shared experts. Logical axis names only: ``sharding/manual.py`` maps them onto the mesh.

Routers (``Router``, ``route``): softmax or sigmoid scores (DeepSeek-V3), optionally group-limited
(the best ``topk_groups`` of ``groups`` expert groups), a per-expert selection bias for aux-loss-free
balancing (``RouterBias``, moved by ``updated_router_bias`` outside the gradient), combine weights
times a routed scaling factor; balance auxiliaries: the Switch loss, the z-loss and DeepSeek-V3's
sequence-wise loss (``layer_metrics``).

Routing groups are batch rows: capacity, drops and priorities depend only on a row's own tokens, so
the result is the same on every mesh and for every microbatching.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.grouped_matmul import grouped_matmul, resolve_matmul, row_tile, tile_layout, tiled_matmul
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


class RouterBias(nnx.Variable):
    """Aux-loss-free balancing's per-expert selection bias [E] (DeepSeek-V3's
    ``e_score_correction_bias``): added to the router scores only to choose experts, moved after each
    step by ``updated_router_bias``. Not an ``nnx.Param``: it takes no gradient and no optimizer."""


@dataclasses.dataclass(frozen=True)
class Router:
    """How a token picks its experts: ``k`` of them under ``mode`` (``router_mode``), among the
    experts of its ``topk_groups`` best of ``groups`` equal groups (0 = all), the combine weights
    times ``scale`` (``routed_scaling_factor``)."""

    k: int
    mode: str
    groups: int = 1
    topk_groups: int = 0
    scale: float = 1.0

    @classmethod
    def of(cls, cfg: ModelConfig) -> Router:
        return cls(cfg.experts_per_token, cfg.router_mode, cfg.router_groups,
                   cfg.router_topk_groups, cfg.routed_scaling_factor)


def limit_to_groups(choice_bte: jax.Array, groups: int, topk_groups: int) -> jax.Array:
    """Group-limited routing (DeepSeek-V3): a group's score is the sum of its best two (one for
    groups of one) selection scores; experts outside a token's ``topk_groups`` best groups get
    -inf. The scores unchanged when every group is kept."""
    if groups == 1 or topk_groups in (0, groups):
        return choice_bte
    b, t, e = choice_bte.shape
    choice_btgn = choice_bte.reshape(b, t, groups, e // groups)
    group_score_btg = jnp.sum(jax.lax.top_k(choice_btgn, min(2, e // groups))[0], axis=-1)
    _, best_btq = jax.lax.top_k(group_score_btg, topk_groups)
    keep_btg = jnp.any(best_btq[..., None] == jnp.arange(groups), axis=-2)
    return jnp.where(keep_btg[..., None], choice_btgn, -jnp.inf).reshape(b, t, e)


def route(x_btd: jax.Array, w_router_de: jax.Array, bias_e: jax.Array,
          router: Router) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(logits_bte, probs_bte, experts_btr, gates_btr): float32 router logits, the scores
    normalised over all experts, each token's k experts (best first) and their combine weights.

    Scores: sigmoid(logits) in the sigmoid modes, else softmax(logits). The experts are the top k
    of scores + ``bias_e`` (no gradient) within the kept groups (``limit_to_groups``); the weights
    come from the unbiased scores: the chosen ones normalised to sum 1 (``softmax_topk``,
    ``sigmoid_topk``) or as they are (``*_unnormalized``), or a softmax over the chosen logits
    (``topk_softmax``); times ``router.scale``."""
    logits_bte = jnp.einsum("btd,de->bte", x_btd.astype(jnp.float32), w_router_de.astype(jnp.float32))
    sigmoid = router.mode.startswith("sigmoid")
    scores_bte = jax.nn.sigmoid(logits_bte) if sigmoid else jax.nn.softmax(logits_bte, axis=-1)
    choice_bte = jax.lax.stop_gradient(scores_bte + bias_e.astype(jnp.float32))
    _, experts_btr = jax.lax.top_k(limit_to_groups(choice_bte, router.groups, router.topk_groups),
                                   router.k)
    if router.mode == "topk_softmax":
        gates_btr = jax.nn.softmax(jnp.take_along_axis(logits_bte, experts_btr, axis=-1), axis=-1)
    else:
        gates_btr = jnp.take_along_axis(scores_bte, experts_btr, axis=-1)
        if router.mode in ("softmax_topk", "sigmoid_topk"):  # + 1e-20 as DeepSeek-V3 (sigmoid)
            gates_btr = gates_btr / (jnp.sum(gates_btr, axis=-1, keepdims=True) + 1e-20)
    probs_bte = scores_bte / jnp.sum(scores_bte, axis=-1, keepdims=True) if sigmoid else scores_bte
    return logits_bte, probs_bte, experts_btr, gates_btr * router.scale


def updated_router_bias(bias_le: jax.Array, load_le: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing's step (DeepSeek-V3): each layer's bias moves by ``rate`` towards
    balance, bias + rate * sign(mean_e(load) - load), with ``load_le`` [L, E] the fraction of each
    layer's assignments each expert got (``expert_load``)."""
    load_le = load_le.astype(jnp.float32)
    error_le = jnp.mean(load_le, axis=-1, keepdims=True) - load_le
    return (bias_le + rate * jnp.sign(error_le)).astype(bias_le.dtype)


def capacity_positions(experts_btr: jax.Array, mask_bt: jax.Array, num_experts: int,
                       capacity: int) -> tuple[jax.Array, jax.Array]:
    """(position_btr, kept_btr): each assignment's place in its expert's queue and whether it fits.

    An expert takes a row's assignments in token order (a token's choices best first) until it holds
    ``capacity``; later ones are dropped. A token's fate depends only on earlier tokens (causal).
    Masked tokens (padding) are not routed and take no place.

    One sort per row of its A = T*R assignments by (expert, order): a place is the rank among the
    expert's assignments. (A cumulative sum over [B, A, E] one-hots, XLA:CPU's O(A^2) window sum,
    took 4x as long at 64 experts, top-8.)"""
    b, t, r = experts_btr.shape
    a = t * r
    routed_ba = jnp.repeat(mask_bt, r, axis=1)  # token-major
    expert_ba = jnp.where(routed_ba, experts_btr.reshape(b, a), num_experts)  # unrouted sort last
    key_ba = jnp.sort(expert_ba * a + jnp.arange(a), axis=-1)
    count_be = jnp.sum(jax.nn.one_hot(expert_ba, num_experts, dtype=jnp.int32), axis=1)
    start_be = jnp.cumsum(count_be, axis=-1) - count_be
    sorted_expert_ba = jnp.minimum(key_ba // a, num_experts - 1)
    rank_ba = jnp.arange(a) - jnp.take_along_axis(start_be, sorted_expert_ba, axis=-1)
    position_ba = jnp.zeros((b, a), rank_ba.dtype).at[jnp.arange(b)[:, None], key_ba % a].set(
        rank_ba, unique_indices=True)
    position_btr = position_ba.reshape(b, t, r)
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
    """Per-row sums over routed (unmasked) tokens: assignments per expert, router probabilities
    (``route``'s normalised scores) per expert, squared logsumexp of the logits, tokens, dropped
    assignments."""
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
                 bias_e: jax.Array, w_up_edf: jax.Array, w_down_efd: jax.Array,
                 *w_gate_edf: jax.Array, router: Router, capacity: int,
                 routing: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The capacity path on one device's rows. With experts sharded, buffers travel to the devices
    holding their experts and back by all-to-all ([B, E, C, D] -> [B * shards, E / shards, C, D])."""
    num_experts = w_router_de.shape[-1]
    logits_bte, probs_bte, experts_btr, gates_btr = route(x_btd, w_router_de, bias_e, router)
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


def grouped_mlp(comm: Collectives, matmul: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                w_up_edf: jax.Array, w_down_efd: jax.Array, w_gate_edf: jax.Array | None) -> jax.Array:
    """The experts' MLP (SwiGLU when ``w_gate_edf`` is given, else GELU) on rows grouped by
    expert, ``matmul(rows, w_edf)`` multiplying each row by its own expert's weight; the down
    projection's partial sums added up over ``expert_mlp`` shards."""
    up = matmul(x, w_up_edf)
    h = jax.nn.silu(matmul(x, w_gate_edf)) * up if w_gate_edf is not None else jax.nn.gelu(up)
    return comm.psum(matmul(h, w_down_efd), "expert_mlp")


def dropless_moe(comm: Collectives, x_btd: jax.Array, mask_bt: jax.Array, w_router_de: jax.Array,
                 bias_e: jax.Array, w_up_edf: jax.Array, w_down_efd: jax.Array,
                 *w_gate_edf: jax.Array, router: Router, matmul: str = "ragged_dot",
                 routing: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The dropless path on one device's rows with every expert's weights: the A = B*T*k
    assignments sorted by expert, grouped matmuls (``matmul``: ragged_dot, megablox or tiled, see
    ``grouped_matmul``), unsorted and combined. ``tiled`` lays the sorted rows out in tiles once
    (``tile_layout``) for all three matmuls. With ``expert_mlp`` sharded each device holds a
    slice of every expert's hidden units, and the down projection's partial sums are added up."""
    b, t, d = x_btd.shape
    k, num_experts = router.k, w_router_de.shape[-1]
    logits_bte, probs_bte, experts_btr, gates_btr = route(x_btd, w_router_de, bias_e, router)
    routed_btr = jnp.broadcast_to(mask_bt[..., None], experts_btr.shape)
    expert_a = jnp.where(routed_btr, experts_btr, num_experts).reshape(-1)  # unrouted sort last
    order_a = jnp.argsort(expert_a, stable=True)
    token_a = jnp.repeat(jnp.arange(b * t), k)[order_a]
    group_sizes_e = jnp.sum(jax.nn.one_hot(expert_a, num_experts, dtype=jnp.int32), axis=0)
    x_nd, w_gate = x_btd.reshape(b * t, d), (w_gate_edf[0] if w_gate_edf else None)
    if matmul == "tiled":
        layout = tile_layout(group_sizes_e, b * t * k, row_tile(b * t * k, num_experts))
        token_p = token_a.at[layout.source_p].get(mode="fill", fill_value=b * t)  # b*t: padding
        x_ntd = x_nd.at[token_p].get(mode="fill", fill_value=0).reshape(-1, layout.tile, d)
        # Recomputed in the backward pass: scanned layers stack every saved activation, which
        # XLA:CPU zero-fills and copies (with 64 experts, top-8: a third of the step's time).
        mlp = jax.checkpoint(functools.partial(grouped_mlp, comm, functools.partial(
            tiled_matmul, group_n=layout.group_n)), policy=jax.checkpoint_policies.nothing_saveable)
        y_ntd = mlp(x_ntd, w_up_edf, w_down_efd, w_gate)
        slot_a = jnp.zeros_like(order_a).at[order_a].set(layout.slot_a)  # in assignment order
        y_btrd = y_ntd.reshape(-1, d).at[slot_a].get(mode="fill", fill_value=0).reshape(b, t, k, d)
    else:
        y_ad = grouped_mlp(comm, lambda x, w: grouped_matmul(x, w, group_sizes_e, matmul),
                           x_nd[token_a], w_up_edf, w_down_efd, w_gate)
        y_ad = jnp.where((expert_a[order_a] < num_experts)[:, None], y_ad, 0)
        y_btrd = jnp.zeros_like(y_ad).at[order_a].set(y_ad).reshape(b, t, k, d)
    weights_btr = jnp.where(routed_btr, gates_btr, 0.0).astype(y_btrd.dtype)
    y_btd = jnp.einsum("btrd,btr->btd", y_btrd, weights_btr)
    stats = router_stats(logits_bte, probs_bte, experts_btr, routed_btr, mask_bt)
    if routing:
        stats |= {"experts_btr": experts_btr, "weights_btr": jnp.where(routed_btr, gates_btr, 0.0)}
    return y_btd, stats


def batch_sums(stats: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """The per-row statistics (``STAT_NAMES``) summed over the rows, and ``seq_aux_sum``: the sum
    over rows b of T_b times row b's sequence-wise balance loss (see ``layer_metrics``), which is
    E / (k T_b) * sum_e assignments_be * prob_sum_be."""
    tokens_be, prob_sum_be = stats["expert_tokens_be"], stats["prob_sum_be"]
    row_scale_b = tokens_be.shape[-1] / (k * jnp.maximum(stats["tokens_b"], 1.0))
    return {"expert_tokens_e": jnp.sum(tokens_be, axis=0), "prob_sum_e": jnp.sum(prob_sum_be, axis=0),
            "seq_aux_sum": jnp.sum(row_scale_b * jnp.sum(tokens_be * prob_sum_be, axis=-1)),
            **{name[:-2]: jnp.sum(stats[name]) for name in ("z_sum_b", "tokens_b", "dropped_b")}}


def load_max_over_mean(load_xe: jax.Array) -> jax.Array:
    """[...]: the largest expert load over the mean load along the last (experts) axis: 1 when
    balanced, E / k when every token takes the same k experts."""
    return jnp.max(load_xe, axis=-1) / jnp.maximum(jnp.mean(load_xe, axis=-1), 1e-30)


def layer_metrics(stats: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """One MoE layer's auxiliaries from its router statistics summed over the batch (``batch_sums``).

    aux_loss = E * sum_e load_e * mean_prob_e (Switch; 1 when balanced), with load_e the fraction of
    the k * tokens assignments routed to expert e (before capacity) and mean_prob_e its mean router
    probability; seq_aux_loss = the same within each row (DeepSeek-V3's sequence-wise balance loss:
    sum_e f_be P_be, f_be = E / (k T_b) * assignments of row b to e, P_be = row b's mean
    probability of e), averaged over rows weighted by their tokens; z_loss = mean
    logsumexp(logits)^2; dropped_frac = dropped / assignments; load_max_over_mean = max_e load_e /
    mean_e load_e (1 when balanced)."""
    tokens = jnp.maximum(stats["tokens"], 1.0)
    load_e = stats["expert_tokens_e"] / (k * tokens)
    mean_prob_e = stats["prob_sum_e"] / tokens
    return {"aux_loss": load_e.shape[0] * jnp.sum(load_e * mean_prob_e),
            "seq_aux_loss": stats["seq_aux_sum"] / tokens,
            "z_loss": stats["z_sum"] / tokens,
            "dropped_frac": stats["dropped"] / (k * tokens),
            "expert_load": load_e,
            "load_max_over_mean": load_max_over_mean(load_e)}


class MoE(nnx.Module):
    """Routed experts (plus shared ones): x [B, T, D] -> (y [B, T, D], this layer's metrics).

    With ``router_bias_rate`` > 0 it holds ``router_bias_e`` [E] (a ``RouterBias``, zeros at first).
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
        if cfg.router_bias_rate > 0:
            self.router_bias_e = RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=("experts",),
                                            eager_sharding=False)
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
        bias_e = (self.router_bias_e[...] if hasattr(self, "router_bias_e")
                  else jnp.zeros((cfg.num_experts,), jnp.float32))
        args = [x_btd, mask_bt, self.w_router_de[...], bias_e,
                adapted_weight(self, "up", self.w_up_edf[...]).astype(dt),
                adapted_weight(self, "down", self.w_down_efd[...]).astype(dt)]
        in_names = [("batch", None, None), ("batch", None), (None, None), (None,),
                    (experts, None, "expert_mlp"), (experts, "expert_mlp", None)]
        if cfg.activation == "swiglu":
            args.append(adapted_weight(self, "gate", self.w_gate_edf[...]).astype(dt))
            in_names.append((experts, None, "expert_mlp"))
        pallas, router = False, Router.of(cfg)
        if cfg.moe_impl == "capacity":
            kernel = functools.partial(capacity_moe, router=router, capacity=cfg.expert_capacity(t),
                                       routing=routing)
        else:
            matmul = resolve_matmul(cfg.moe_matmul)
            pallas = matmul == "megablox"
            kernel = functools.partial(dropless_moe, router=router, matmul=matmul, routing=routing)
        stat_names = STAT_NAMES | ROUTING_NAMES if routing else STAT_NAMES
        y_btd, stats = manual(kernel, args, in_names, (("batch", None, None), stat_names),
                              within={"experts": "batch"}, check_vma=not pallas)
        y_btd = constrain(y_btd, ("batch", "length", "embed"))
        if cfg.num_shared_experts:
            y_btd = y_btd + self.shared(x_btd)
        if routing:
            self.sow(nnx.Intermediate, "routing_experts", stats["experts_btr"])
            self.sow(nnx.Intermediate, "routing_weights", stats["weights_btr"])
        k = cfg.experts_per_token
        return y_btd, layer_metrics(batch_sums(stats, k), k)
