"""LoRA adapters: a low-rank update ``x W + (alpha / r) dropout(x) A B`` on chosen projections of an
already built model (attention q, k, v, o; MLP gate, up, down; optionally the MoE experts' gate, up,
down), their merge into the base weights, and their parameter count. B starts at zero, so a model
with fresh adapters computes what its base computes; a model without adapters is untouched.

Adapters are attached after the model is built, next to the weight they adapt (``lora_q`` beside
``w_q_dnh``), and mirror its leading axes: a stacked weight [L, D, N, H] gets A [L, D, r] and
B [L, r, N, H] with the weight's logical names (None for r), so scanned stacks slice them per layer
and ``sharding/`` places them like the weight. Expert adapters ([L, E, D, r], [L, E, r, F]) are added
to the expert weights before the expert kernels run (no dropout there).

Dropout masks are drawn row by row: row r of a step's batch gets its mask from
``fold_in(layer key, r)``, with the layer key from (seed, step, adapter) (``with_dropout_keys``) and
r the row's index in the step's whole batch (``set_dropout_rows``; by default the input's own row
numbers). A step accumulated over microbatches therefore draws the masks of the whole-batch step.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.primitives import dense

# target -> (weight attribute, input dims, output dims) of the dense projections
DENSE_TARGETS: dict[str, tuple[str, int, int]] = {
    "q": ("w_q_dnh", 1, 2), "k": ("w_k_dkh", 1, 2), "v": ("w_v_dkh", 1, 2), "o": ("w_o_nhd", 2, 1),
    "gate": ("w_gate_df", 1, 1), "up": ("w_up_df", 1, 1), "down": ("w_down_fd", 1, 1),
}
# target -> weight attribute of the MoE experts ([E, in, out] per layer)
EXPERT_TARGETS: dict[str, str] = {"gate": "w_gate_edf", "up": "w_up_edf", "down": "w_down_efd"}
TARGETS: tuple[str, ...] = tuple(DENSE_TARGETS)


class LoRAParam(nnx.Param):
    """An adapter weight (A or B): what a LoRA fine-tune trains, ``nnx.split(model, LoRAParam, ...)``."""


class LoRAKey(nnx.Variable):
    """Per-layer dropout keys of one adapter (raw uint32 key data), replaced by every training step."""


class LoRARows(nnx.Variable):
    """The index of each input row in the training step's whole batch, per layer [*lead, B] (set by
    ``set_dropout_rows`` for each microbatch): it keys that row's dropout masks."""


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Rank, alpha (the update is scaled by alpha / rank), input dropout, targeted projections, and
    whether the MoE experts' projections are adapted too."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    experts: bool = False


def _names(weight: nnx.Variable) -> tuple[str | None, ...]:
    names = weight.get_metadata().get("out_sharding")
    return tuple(names) if names is not None else (None,) * weight.ndim


def _variable(cls: type, value: jax.Array, names: tuple[str | None, ...]) -> nnx.Variable:
    return cls(value, out_sharding=names, eager_sharding=False)


def delta_weight(a: jax.Array, b: jax.Array, in_dims: int, scaling: float) -> jax.Array:
    """``scaling * A B`` shaped like the adapted weight: A [..., *in, r] and B [..., r, *out] share
    their leading (layer, expert) axes; the result is [..., *in, *out]."""
    lead = a.ndim - in_dims - 1
    in_shape, out_shape, r = a.shape[lead:-1], b.shape[lead + 1:], a.shape[-1]
    a_lir = a.reshape(a.shape[:lead] + (math.prod(in_shape), r))
    b_lro = b.reshape(b.shape[:lead] + (r, math.prod(out_shape)))
    return (scaling * jnp.matmul(a_lir, b_lro)).reshape(a.shape[:lead] + in_shape + out_shape)


class LoRA(nnx.Module):
    """One projection's adapter: A [*lead, *in, r] (normal, std 1/sqrt(fan-in)), B [*lead, r, *out]
    (zeros); ``lead`` are the weight's leading stacked axes (layers, experts)."""

    def __init__(self, weight: nnx.Variable, in_dims: int, out_dims: int, spec: LoRASpec,
                 rngs: nnx.Rngs, *, dropout: float):
        shape, names = tuple(weight.shape), _names(weight)
        lead = len(shape) - in_dims - out_dims
        in_shape, out_shape = shape[lead:lead + in_dims], shape[lead + in_dims:]
        r, dtype = spec.rank, weight.dtype
        a_value = jax.random.normal(rngs.params(), shape[:lead] + in_shape + (r,), dtype)
        self.a = _variable(LoRAParam, a_value / math.sqrt(math.prod(in_shape)),
                           names[:lead + in_dims] + (None,))
        self.b = _variable(LoRAParam, jnp.zeros(shape[:lead] + (r,) + out_shape, dtype),
                           names[:lead] + (None,) + names[lead + in_dims:])
        self.in_dims = in_dims
        self.scaling = spec.alpha / spec.rank
        self.dropout = dropout
        self.deterministic = False  # True: no dropout (evaluation, merging)
        if dropout:
            self.key = _variable(LoRAKey, jnp.zeros(shape[:lead] + (2,), jnp.uint32),
                                 names[:lead] + (None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        """The update for input ``x`` [..., *in] -> [..., *out], in ``x``'s dtype."""
        if self.dropout and not self.deterministic:
            x = self.dropped(x)
        h = dense(x, self.a[...].astype(x.dtype), self.in_dims) * self.scaling
        return dense(h, self.b[...].astype(x.dtype), 1)

    def dropped(self, x: jax.Array) -> jax.Array:
        """Inverted dropout of ``x`` [B, ...]: row b's mask is drawn from ``fold_in(key, rows[b])``,
        so it is the same whichever microbatch holds the row."""
        rows_b = self.rows[...] if hasattr(self, "rows") else jnp.arange(x.shape[0], dtype=jnp.int32)
        keys_b = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.wrap_key_data(self.key[...]),
                                                         rows_b)
        keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - self.dropout, x.shape[1:]))(keys_b)
        return jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))

    def delta(self) -> jax.Array:
        """``(alpha / r) A B`` shaped like the adapted weight."""
        return delta_weight(self.a[...], self.b[...], self.in_dims, self.scaling)


def unmatched_targets(cfg: ModelConfig, spec: LoRASpec) -> list[str]:
    """The targets of ``spec`` that no weight of a model built from ``cfg`` has (no dense MLP in
    an all-MoE model without shared experts, no gate in a GELU model, no k or v with MLA), from the
    config alone."""
    dense_mlp = cfg.num_dense_first > 0 or (cfg.num_moe_layers > 0 and cfg.moe_every > 1) or \
        (cfg.is_moe and cfg.num_shared_experts > 0)
    experts = spec.experts and cfg.is_moe
    mlp = {"up", "down"} | ({"gate"} if cfg.gated_mlp else set())
    attention = {"q", "k", "v", "o"}
    if cfg.attention_type == "mla":  # keys and values come from a latent; a low-rank query has no w_q
        attention = {"o"} | (set() if cfg.q_lora_rank else {"q"})
    present = attention | (mlp if dense_mlp or experts else set())
    return [t for t in spec.targets if t not in present]


# ------------------------------------------------------------------ hooks used by the model's layers


def adapted(module: nnx.Module, target: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """``y = x W`` plus the update of ``module``'s adapter for ``target``, if it has one."""
    adapter = getattr(module, f"lora_{target}", None)
    return y if adapter is None else y + adapter(x).astype(y.dtype)


def adapted_weight(module: nnx.Module, target: str, w: jax.Array) -> jax.Array:
    """The expert weight ``w`` plus ``module``'s expert adapter update for ``target``, if any."""
    adapter = getattr(module, f"lora_{target}", None)
    return w if adapter is None else w + adapter.delta().astype(w.dtype)


# --------------------------------------------------------------------- attaching, merging, counting


def add_lora(model: nnx.Module, spec: LoRASpec, rngs: nnx.Rngs) -> nnx.Module:
    """Attaches adapters for ``spec`` to every matching projection of ``model`` (in place) and
    returns it. ValueError if no target matches a weight of this model (``unmatched_targets``
    names the ones that match none)."""
    unknown = [t for t in spec.targets if t not in DENSE_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target {unknown[0]!r} (known: {', '.join(TARGETS)})")
    matched = dict.fromkeys(spec.targets, 0)
    for _, module in list(nnx.iter_modules(model)):
        for target in spec.targets:
            name, in_dims, out_dims = DENSE_TARGETS[target]
            expert_name = EXPERT_TARGETS.get(target, "")
            if hasattr(module, name):
                setattr(module, f"lora_{target}", LoRA(getattr(module, name), in_dims, out_dims, spec,
                                                       rngs, dropout=spec.dropout))
                matched[target] += 1
            elif spec.experts and expert_name and hasattr(module, expert_name):
                setattr(module, f"lora_{target}", LoRA(getattr(module, expert_name), 1, 1, spec,
                                                       rngs, dropout=0.0))
                matched[target] += 1
    if not any(matched.values()):
        raise ValueError(f"no LoRA target of {', '.join(spec.targets)} matches a weight of this model")
    return model


def adapters(model: nnx.Module) -> list[tuple[nnx.Module, str, LoRA]]:
    """(module, attribute, adapter) for every adapter attached to ``model``."""
    return [(module, name, value) for _, module in nnx.iter_modules(model)
            for name, value in list(vars(module).items())
            if name.startswith("lora_") and isinstance(value, LoRA)]


def set_deterministic(model: nnx.Module, deterministic: bool) -> nnx.Module:
    """Turns the adapters' dropout off (True) or on (False), in place; returns ``model``."""
    for _, _, adapter in adapters(model):
        adapter.deterministic = deterministic
    return model


def set_dropout_rows(model: nnx.Module, rows_b: jax.Array) -> nnx.Module:
    """Tells every dropout adapter of ``model`` (in place; returns it) that its inputs' rows are rows
    ``rows_b`` [B] of the training step's whole batch."""
    for _, _, adapter in adapters(model):
        if adapter.dropout:
            lead = adapter.key.shape[:-1]
            adapter.rows = LoRARows(jnp.broadcast_to(rows_b.astype(jnp.int32), lead + rows_b.shape))
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Adds every adapter's ``(alpha / r) A B`` into the weight it adapts and removes the adapters
    (in place); returns ``model``, now a plain model whose params fit a model built without LoRA."""
    for module, name, adapter in adapters(model):
        target = name[len("lora_"):]
        weight_name = DENSE_TARGETS[target][0]
        if not hasattr(module, weight_name):
            weight_name = EXPERT_TARGETS[target]
        weight = getattr(module, weight_name)
        weight[...] = weight[...] + adapter.delta().astype(weight.dtype)
        delattr(module, name)
    return model


def with_dropout_keys(state: Any, step: jax.Array, seed: int) -> Any:
    """``state`` with every LoRAKey leaf replaced by fresh per-layer keys of training ``step``
    (a function of seed, step and the leaf's path, so a resumed run draws the same masks)."""
    step_key = jax.random.fold_in(jax.random.key(seed), step)

    def refresh(path: tuple, leaf: Any) -> Any:
        if not isinstance(leaf, LoRAKey):
            return leaf
        key = jax.random.fold_in(step_key, zlib.crc32(jax.tree_util.keystr(path).encode()))
        count = math.prod(leaf.shape[:-1])
        keys = jax.random.key_data(jax.random.split(key, count)).reshape(leaf.shape)
        return leaf.replace(keys.astype(jnp.uint32))

    return jax.tree_util.tree_map_with_path(refresh, state,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))

