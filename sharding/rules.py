"""Logical -> mesh axis tables, and their resolution to PartitionSpecs and NamedShardings.

One table maps every logical axis name to zero or more mesh axes. A mesh axis is used at most once
per array (later dimensions lose), and a dimension whose size the mesh axes do not divide is left
replicated, so any table is valid for any shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, tuple[str, ...]], ...]


def default_rules() -> Rules:
    """Data/FSDP/context/tensor/expert parallelism: the MaxText-style default table.

    ``length`` (activations, batches, the KV cache's slots) is split over ``context``; the learned
    position table's rows are ``positions``, left whole (any device may look up any position: packed
    rows restart them). ``embed`` takes ``context`` after ``fsdp``, so the devices of a context group
    also share the parameters, gradients and optimizer state between them (as MaxText does). On an
    activation [batch, length, embed] ``length`` claims ``context`` first (a mesh axis is used once
    per array), so ``embed`` keeps it only where the length is not split (a one-token decode step).
    A paged KV cache's blocks (``kv_blocks``) and their slots (``block``) stay whole on every device
    (any row may read any block); its ``kv_heads`` split over ``tensor`` like the heads writing them."""
    return (
        ("batch", ("data", "fsdp", "expert")),
        ("length", ("context",)),
        ("positions", ()),
        ("embed", ("fsdp", "context")),
        ("heads", ("tensor",)),
        ("kv_heads", ("tensor",)),
        ("head_dim", ()),
        ("q_lora", ()),
        ("kv_lora", ()),
        ("mlp", ("tensor",)),
        ("vocab", ("tensor",)),
        ("experts", ("expert",)),
        ("expert_mlp", ("tensor",)),
        ("layers", ()),
        ("kv_blocks", ()),
        ("block", ()),
    )


def mesh_axes_of(name: str | None, rules: Rules) -> tuple[str, ...]:
    """The mesh axes the logical axis ``name`` maps to (none for None)."""
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            return mesh_axes
    raise KeyError(f"logical axis {name!r} has no rule")


def shards_of(name: str, sizes: dict[str, int], rules: Rules) -> int:
    """Into how many parts a dimension named ``name`` is split on a mesh of axis ``sizes`` (when its
    size allows): e.g. the data-parallel size for ``batch``. Config validation asks this, so that
    only this table knows which mesh axes shard what."""
    return math.prod(sizes[axis] for axis in mesh_axes_of(name, rules))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh,
                    rules: Rules) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry logical ``names``.

    With ``shape`` given, mesh axes that do not divide a dimension are dropped (that dimension is
    then sharded over fewer axes, or replicated). Mesh axes of size 1 are dropped too.
    """
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        chosen = []
        size = 1
        for axis in mesh_axes_of(name, rules):
            if axis in used or axis not in mesh.shape or mesh.shape[axis] == 1:
                continue
            if shape is not None and shape[dim] % (size * mesh.shape[axis]):
                continue
            chosen.append(axis)
            size *= mesh.shape[axis]
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def logical_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules: Rules) -> NamedSharding:
    """The NamedSharding of an array of ``shape`` whose dimensions carry logical ``names``."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def _variable_spec(var: nnx.Variable, mesh: Mesh, rules: Rules) -> PartitionSpec:
    names = var.get_metadata().get("out_sharding")
    if names is None:
        return PartitionSpec()
    return logical_to_spec(names, var.shape, mesh, rules)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a pytree (abstract or concrete) whose leaves may be nnx Variables.

    Variables (params, and optimizer moments that keep the Param wrappers) are sharded by their
    logical names; any other leaf (step counters, scalars) is replicated.
    """
    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            return leaf.replace(NamedSharding(mesh, _variable_spec(leaf, mesh, rules)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def tree_specs(tree: Any, mesh: Mesh, rules: Rules) -> dict[str, str]:
    """{"path/to/param": "PartitionSpec(...)"} for every Variable in ``tree``: a readable summary."""
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    out = {}
    for path, leaf in flat:
        if isinstance(leaf, nnx.Variable):
            key = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            out[key] = str(_variable_spec(leaf, mesh, rules))
    return out
