"""Constrain activations by logical axis names under the active (mesh, rules); a no-op without one.

The training and evaluation code enter ``activation_sharding(mesh, rules)`` around tracing; model code
calls ``constrain(x, ("batch", "length", "embed"))`` and never learns the mesh axis names.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from sharding.rules import Rules, logical_to_spec

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "meshlm_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this block (at trace time), ``constrain`` resolves names with ``rules`` on ``mesh``."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def under_activation_sharding(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
    """``fn`` running inside ``activation_sharding(mesh, rules)``: a function to jit, whose trace
    then resolves its ``constrain`` calls on that mesh wherever it is called from."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    # jit names its program after this: train_step, not "wrapped" (wraps copies no name from a
    # partial), in profiles (jit_train_step), HLO dumps and compile logs
    inner = fn.func if isinstance(fn, functools.partial) else fn
    wrapped.__name__ = wrapped.__qualname__ = getattr(inner, "__name__", "step")
    return wrapped


def active() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the enclosing ``activation_sharding`` block, or None outside one."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Annotate ``x`` with the sharding its logical ``names`` map to (GSPMD hint, Auto axes)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def target_platform() -> str:
    """The platform (``tpu``, ``gpu``, ``cpu``) the traced program is for: that of the active mesh's
    devices (a TPU topology compiled for ahead of time on a CPU host), else JAX's default backend.
    Kernel choices (``attention_impl=auto``, ``moe_matmul=auto``) follow it."""
    context = _ACTIVE.get()
    if context is None:
        return jax.default_backend()
    return context[0].devices.flat[0].platform


def shards(name: str, size: int | None = None) -> int:
    """Into how many parts the active mesh splits a dimension of logical axis ``name`` (1 outside an
    ``activation_sharding`` block): model code asks "is the length split?" without naming mesh
    axes. With ``size``, for a dimension of that size: mesh axes that do not divide it are left out,
    as ``logical_to_spec`` does (a one-token decode step's length is not split)."""
    context = _ACTIVE.get()
    if context is None:
        return 1
    mesh, rules = context
    spec = logical_to_spec((name,), None if size is None else (size,), mesh, rules)
    entry = spec[0] if len(spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[axis] for axis in axes)
