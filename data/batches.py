"""Host batches -> global ``jax.Array``s sharded over the batch axes (each process gives its rows)."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

Batch = dict[str, jax.Array]


def to_global(local: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> Batch:
    """This process's rows -> one global array per field, laid out by ``sharding``."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size,) + v.shape[1:])
            for k, v in local.items()}


def equalize_across_processes(batches: list, empty: dict[str, np.ndarray]) -> list:
    """Pads every process's list of evaluation batches to the longest one with ``empty`` batches,
    so all processes run the same number of (collective) eval steps."""
    if jax.process_count() == 1:
        return batches
    longest = int(np.max(multihost_utils.process_allgather(np.int32(len(batches)))))
    return batches + [empty] * (longest - len(batches))
