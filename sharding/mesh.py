"""Device mesh from a MeshConfig (-1 fills the remaining devices), over one TPU slice or several
joined by the data-center network (DCN), and multi-process start-up.

Multislice: ``dcn_data`` and ``dcn_fsdp`` split the ``data`` and ``fsdp`` axes across slices, which
talk over the DCN, much slower than the chips' own interconnect (ICI); the other axes stay within a
slice (``axes.DCN_AXES``). An axis's size in the mesh is its
ICI size (per slice; ``data``, ``fsdp``, ...) times its DCN size. The mesh is JAX's hybrid mesh
(``mesh_utils.create_hybrid_device_mesh``): along each axis the slice index is the outer part of
the position, so slice ``s`` of ``dcn_data=2`` holds the ``data`` positions ``s * data`` to
``(s + 1) * data - 1``. Slices are the devices' ``slice_index`` (TPU), else their processes (one
process per slice, ``process_is_granule``); on the CPU backend in one process, whose devices belong
to no slice, the devices are emulated as slices of consecutive device ids.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh

from core.options import option
from sharding.axes import DCN_AXES, MESH_AXES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; at most one may be -1 (fill with the remaining devices)."""

    data: int = option(-1, "pure data parallelism: replicas, each with the whole model")
    fsdp: int = option(1, "shards parameters, gradients and optimizer state (and the batch)")
    context: int = option(1, "context parallelism: shards the sequence (attention all-gathers keys "
                             "and values); also shards parameters like fsdp")
    tensor: int = option(1, "shards attention heads and MLP hidden units (Megatron style)")
    expert: int = option(1, "shards the MoE experts (and the batch outside expert layers)")

    dcn_data: int = option(1, "multislice: slices across which data is split (data-center "
                              "network); the mesh's data axis is data x dcn_data")
    dcn_fsdp: int = option(1, "multislice: slices across which fsdp is split; the mesh's fsdp axis "
                              "is fsdp x dcn_fsdp")

    def dcn_sizes(self) -> dict[str, int]:
        """How many slices each mesh axis spans (1 for an axis within a slice); raises ValueError
        naming a bad ``mesh.dcn_*`` key."""
        for axis in DCN_AXES:
            if getattr(self, f"dcn_{axis}") < 1:
                raise ValueError(f"mesh.dcn_{axis}: must be >= 1, got {getattr(self, f'dcn_{axis}')}")
        return {axis: getattr(self, f"dcn_{axis}") if axis in DCN_AXES else 1 for axis in MESH_AXES}

    @property
    def slices(self) -> int:
        """Slices of the mesh: the product of the ``dcn_*`` sizes."""
        return math.prod(getattr(self, f"dcn_{axis}") for axis in DCN_AXES)

    def ici_sizes(self, num_devices: int) -> dict[str, int]:
        """Axis sizes within one slice of ``num_devices // slices`` devices (-1 filled); raises
        ValueError naming the bad key."""
        dcn = self.dcn_sizes()
        slices = math.prod(dcn.values())
        if num_devices % slices:
            key = next(f"dcn_{axis}" for axis in DCN_AXES if dcn[axis] > 1)
            raise ValueError(f"mesh.{key}: the dcn_* sizes multiply to {slices} slices, which do "
                             f"not divide the {num_devices} devices")
        per_slice = num_devices // slices
        raw = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in raw.items():
            if size == 0 or size < -1:
                raise ValueError(f"mesh.{axis}: must be a positive size or -1, got {size}")
        fills = [axis for axis, size in raw.items() if size == -1]
        if len(fills) > 1:
            raise ValueError(f"mesh.{fills[1]}: only one mesh axis may be -1 (also {fills[0]})")
        fixed = math.prod(size for size in raw.values() if size != -1)
        where = f"the {per_slice} devices of each of {slices} slices" if slices > 1 else \
            f"the {num_devices} devices"
        if fills:
            if per_slice % fixed:
                raise ValueError(f"mesh.{fills[0]}: the other axes multiply to {fixed}, which does "
                                 f"not divide {where}")
            raw[fills[0]] = per_slice // fixed
        elif fixed != per_slice:
            shape = ",".join(f"{a}={s}" for a, s in raw.items())
            raise ValueError(f"mesh: product of mesh axes {shape} is {fixed}, but there are "
                             f"{where[4:]}")
        return raw

    def sizes(self, num_devices: int) -> dict[str, int]:
        """Concrete axis sizes of the whole mesh over ``num_devices`` (ICI size x DCN size);
        raises ValueError naming the bad key."""
        ici, dcn = self.ici_sizes(num_devices), self.dcn_sizes()
        return {axis: ici[axis] * dcn[axis] for axis in MESH_AXES}

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
    compiled for ahead of time), else in device order. With ``dcn_*`` sizes, the hybrid mesh of
    ``cfg.slices`` slices (module docstring); ValueError naming ``mesh.dcn_*`` when the devices are
    in another number of slices."""
    devices = list(jax.devices()) if devices is None else list(devices)
    sizes = cfg.sizes(len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if cfg.slices > 1:
        return Mesh(hybrid_grid(cfg, devices), MESH_AXES, axis_types=axis_types)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    grid = np.asarray(devices).reshape(shape)
    if physical:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            pass
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def slice_groups(devices: list) -> tuple[str, int]:
    """(how ``devices`` divide into slices, the number of slices that gives): ``slice_index`` on TPU
    (hosts of one slice share it), else ``process_index`` (one process per slice), else, for the CPU
    devices of one process, which belong to no slice, ``emulated`` (0: any number)."""
    if devices[0].platform == "tpu":
        return "slice_index", len({getattr(d, "slice_index", 0) for d in devices})
    processes = len({d.process_index for d in devices})
    if processes == 1 and devices[0].platform == "cpu":
        return "emulated", 0
    return "process_index", processes


def check_slices(cfg: MeshConfig, devices: list) -> None:
    """ValueError naming ``mesh.dcn_*`` unless ``devices`` are in ``cfg.slices`` slices (emulated
    CPU slices are any number)."""
    grouping, count = slice_groups(devices)
    if cfg.slices > 1 and grouping != "emulated" and count != cfg.slices:
        key = next(f"dcn_{axis}" for axis in DCN_AXES if getattr(cfg, f"dcn_{axis}") > 1)
        where = "slice(s)" if grouping == "slice_index" else "processes (one slice each)"
        raise ValueError(f"mesh.{key}: the dcn_* sizes multiply to {cfg.slices} slices, but the "
                         f"devices are in {count} {where}")


def hybrid_grid(cfg: MeshConfig, devices: list) -> np.ndarray:
    """The device grid of a multislice mesh: ``mesh_utils.create_hybrid_device_mesh`` over the
    slices the devices belong to (their ``slice_index``, else their process), each slice laid out
    along its torus; emulated slices on one process's CPU devices are consecutive device ids, laid
    out the same way (slice index outermost along each axis)."""
    ici, dcn = cfg.ici_sizes(len(devices)), cfg.dcn_sizes()
    ici_shape, dcn_shape = [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES]
    grouping, _ = slice_groups(devices)
    if grouping == "emulated":
        blocks = np.asarray(devices).reshape(dcn_shape + ici_shape)
        n = len(MESH_AXES)  # (dcn_0, ..., dcn_n, ici_0, ..., ici_n) -> (dcn_0, ici_0, dcn_1, ...)
        order = [axis for i in range(n) for axis in (i, n + i)]
        return blocks.transpose(order).reshape([ici[a] * dcn[a] for a in MESH_AXES])
    check_slices(cfg, devices)
    return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                process_is_granule=grouping == "process_index",
                                                allow_split_physical_axes=True)


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
