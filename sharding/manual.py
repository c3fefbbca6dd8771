"""Per-device code inside ``jax.shard_map``: arguments laid out by logical axis names, collectives
named by logical axes (the MoE layer's expert all-to-all). Outside an ``activation_sharding`` block
the function runs once on the global arrays and every collective is the identity.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

from sharding.constrain import active
from sharding.rules import Rules, logical_to_spec

Names = tuple[str | None, ...]


class Collectives:
    """Collectives over the mesh axes that logical names resolved to in one ``manual`` call. A name
    that resolved to no mesh axis (one device, or a dimension left whole) makes each the identity."""

    def __init__(self, axes: Mapping[str, tuple[str, ...]] | None = None):
        self.axes = dict(axes or {})

    def all_to_all(self, x: jax.Array, name: str, split_axis: int, concat_axis: int) -> jax.Array:
        """Splits ``split_axis`` into one chunk per ``name`` shard, sends chunk i to shard i and
        concatenates what arrives along ``concat_axis`` (in shard order)."""
        axes = self.axes.get(name, ())
        if not axes:
            return x
        return jax.lax.all_to_all(x, axes[0] if len(axes) == 1 else axes, split_axis, concat_axis,
                                  tiled=True)

    def psum(self, x: jax.Array, name: str) -> jax.Array:
        """Sum over the shards of dimension ``name`` (after a matmul that contracted it)."""
        axes = self.axes.get(name, ())
        return jax.lax.psum(x, axes) if axes else x


LOCAL = Collectives()


def _is_names(x: Any) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def _spec_axes(spec: PartitionSpec, dim: int) -> tuple[str, ...]:
    entry = spec[dim] if dim < len(spec) else None
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _resolve(args: Sequence[jax.Array], in_names: Sequence[Names], mesh: Mesh,
             rules: Rules) -> tuple[tuple[PartitionSpec, ...], dict[str, tuple[str, ...]]]:
    """Each argument's PartitionSpec, and the mesh axes each logical name resolved to."""
    in_specs = tuple(logical_to_spec(names, a.shape, mesh, rules)
                     for names, a in zip(in_names, args, strict=True))
    axes: dict[str, tuple[str, ...]] = {}
    for names, spec in zip(in_names, in_specs, strict=True):
        for dim, name in enumerate(names):
            if name is not None and axes.setdefault(name, _spec_axes(spec, dim)) != _spec_axes(spec, dim):
                raise ValueError(f"logical axis {name!r} maps to different mesh axes in one call "
                                 f"({axes[name]} vs {_spec_axes(spec, dim)}); give its dimensions "
                                 "sizes that the same mesh axes divide")
    return in_specs, axes


def manual(fn: Callable[..., Any], args: Sequence[jax.Array], in_names: Sequence[Names],
           out_names: Any, within: Mapping[str, str] | None = None, check_vma: bool = True) -> Any:
    """``fn(collectives, *local_args)`` on every device, each argument split by the mesh axes its
    logical ``in_names`` map to (dimensions named None are whole on every device, gathered at the
    boundary); outputs are assembled from ``out_names`` (a pytree of name tuples matching ``fn``'s
    outputs). The same ``fn`` runs unchanged, with ``LOCAL`` collectives, when no mesh is active.

    ``within={"experts": "batch"}`` splits dimensions named ``experts`` only over mesh axes that
    also split the ``batch`` dimensions in this call (so that an all-to-all over ``experts`` moves
    distinct rows); the others stay whole (e.g. a batch too small to split).

    ``check_vma=False`` for an ``fn`` that calls a Pallas kernel: a ``pallas_call``'s outputs carry
    no record of the mesh axes they vary over, which ``jax.shard_map``'s check requires."""
    context = active()
    if context is None:
        return fn(LOCAL, *args)
    mesh, rules = context
    in_specs, axes = _resolve(args, in_names, mesh, rules)
    if within and any(not set(axes.get(n, ())) <= set(axes.get(b, ())) for n, b in within.items()):
        rules = tuple((name, tuple(a for a in mesh_axes if a in axes.get(within[name], ())))
                      if name in within else (name, mesh_axes) for name, mesh_axes in rules)
        in_specs, axes = _resolve(args, in_names, mesh, rules)
    out_shapes = jax.eval_shape(functools.partial(fn, LOCAL), *args)
    out_specs = jax.tree.map(lambda names, s: logical_to_spec(names, s.shape, mesh, rules),
                             out_names, out_shapes, is_leaf=_is_names)
    comm = Collectives(axes)
    return jax.shard_map(functools.partial(fn, comm), mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=check_vma)(*args)
