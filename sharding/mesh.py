"""Device mesh from a MeshConfig (-1 fills the remaining devices) and multi-process start-up."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh

from core.options import option
from sharding.axes import MESH_AXES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; at most one may be -1 (fill with the remaining devices)."""

    data: int = option(-1, "pure data parallelism: replicas, each with the whole model")
    fsdp: int = option(1, "shards parameters, gradients and optimizer state (and the batch)")
    context: int = option(1, "context parallelism: shards the sequence (attention all-gathers keys "
                             "and values); also shards parameters like fsdp")
    tensor: int = option(1, "shards attention heads and MLP hidden units (Megatron style)")
    expert: int = option(1, "shards the MoE experts (and the batch outside expert layers)")

    def sizes(self, num_devices: int) -> dict[str, int]:
        """Concrete axis sizes for ``num_devices``; raises ValueError naming the bad key."""
        raw = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in raw.items():
            if size == 0 or size < -1:
                raise ValueError(f"mesh.{axis}: must be a positive size or -1, got {size}")
        fills = [axis for axis, size in raw.items() if size == -1]
        if len(fills) > 1:
            raise ValueError(f"mesh.{fills[1]}: only one mesh axis may be -1 (also {fills[0]})")
        fixed = math.prod(size for size in raw.values() if size != -1)
        if fills:
            if num_devices % fixed:
                raise ValueError(f"mesh.{fills[0]}: the other axes multiply to {fixed}, which does "
                                 f"not divide the {num_devices} devices")
            raw[fills[0]] = num_devices // fixed
        elif fixed != num_devices:
            shape = ",".join(f"{a}={s}" for a, s in raw.items())
            raise ValueError(f"mesh: product of mesh axes {shape} is {fixed}, but there are "
                             f"{num_devices} devices")
        return raw

    def fitting(self, num_devices: int) -> MeshConfig:
        """This mesh when it fits ``num_devices``, else every device on ``data`` (evaluating a run
        on other devices than it trained on)."""
        try:
            self.sizes(num_devices)
            return self
        except ValueError:
            return MeshConfig()


def make_mesh(cfg: MeshConfig, devices: list | None = None, *, physical: bool = False) -> Mesh:
    """A mesh over ``devices`` (default: all) with Auto axis types, so GSPMD propagates shardings.
    ``physical``: laid out along the devices' torus when ``mesh_utils`` knows how (a TPU topology
    compiled for ahead of time), else in device order."""
    devices = list(jax.devices()) if devices is None else list(devices)
    sizes = cfg.sizes(len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    grid = np.asarray(devices).reshape(shape)
    if physical:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            pass
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def initialize_distributed(coordinator: str = "", num_processes: int = 0,
                           process_id: int = -1, init_timeout: int = 120,
                           heartbeat_timeout: int = 100) -> None:
    """One process per host: join JAX's multi-controller runtime. Without a coordinator address
    the cluster is auto-detected (TPU VMs, SLURM, ...); with one, the caller names the process
    count and this process's index (local multi-process runs on CPU use gloo collectives).
    Joining gives up after ``init_timeout`` seconds; a process silent for ``heartbeat_timeout``
    seconds counts as dead and the coordination service stops the others."""
    timeouts = {"initialization_timeout": init_timeout,
                "heartbeat_timeout_seconds": heartbeat_timeout}
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                                   **timeouts)
    else:
        jax.distributed.initialize(**timeouts)


def sync_processes(name: str) -> None:
    """Every process waits here until all have arrived (files written by process 0 are visible)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def broadcast_from_0(value: int) -> int:
    """Process 0's ``value`` on every process (a collective when there are several), so that all
    take the same branch after a check only process 0 made."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
