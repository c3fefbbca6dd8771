"""Host environment set before JAX loads: keep the TPU runtime quiet on hosts without TPU chips.

The ``tpu`` extra installs libtpu so that any host can compile for TPU topologies. On a machine
without TPU chips JAX still probes it at start-up: libtpu queries a metadata server that is not
there and prints warnings before JAX falls back to the CPU. Where no TPU device files exist we give
libtpu the facts it would look up, so start-up is quiet and quick. TPU VMs are left untouched.
"""

from __future__ import annotations

import os
from pathlib import Path

TPU_DEVICE_GLOBS = ("accel*", "vfio/[0-9]*")  # v4/v5e expose /dev/accel*, v5p/v6e /dev/vfio/N


def has_tpu_devices(dev: Path = Path("/dev")) -> bool:
    return any(any(dev.glob(pattern)) for pattern in TPU_DEVICE_GLOBS)


def quiet_tpu_probe() -> None:
    """On a host without TPU chips (and JAX_PLATFORMS unset), skip libtpu's metadata queries."""
    if os.environ.get("JAX_PLATFORMS") or has_tpu_devices():
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
