"""The host a command runs on, prepared before JAX starts its backends: a quiet TPU probe, the number
of emulated CPU devices, joining ``jax.distributed`` (with a watchdog, since JAX aborts with a C++
stack trace when joining times out), and loading a checkpoint onto the devices.

The ``tpu`` extra installs libtpu so that any host can compile for TPU topologies. On a machine
without TPU chips JAX still probes it when its backends start: libtpu queries a metadata server that
is not there and prints warnings before JAX falls back to the CPU. Where no TPU device files exist we
give libtpu the facts it would look up, so start-up is quiet and quick. TPU VMs are left untouched.
These settings are read when the backends start, not when ``jax`` is imported.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import jax

from core.errors import RunError, first_line
from inference.load import LoadedRun, load_run, read_run_config
from sharding.mesh import initialize_distributed
from train.config import RunConfig

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


def use_cpu_devices(count: int, *, unless_started: bool = False) -> None:
    """Emulates ``count`` CPU devices. Once JAX's backends have started another count is a
    RuntimeError, or with ``unless_started`` the devices there are stay (e.g. inside the test
    suite)."""
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        if not unless_started:
            raise


def load_checkpoint(path: str | Path) -> LoadedRun:
    """The run of a checkpoint (a run directory: its newest checkpoint that verifies, as training
    would resume it; or one of its steps, refused if damaged), loaded onto the devices its config
    asks this host to emulate (see ``inference.load.load_run``)."""
    use_cpu_devices(read_run_config(path).run.cpu_devices)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices are not news
    return load_run(path)


def setup_devices(run: RunConfig) -> int:
    """Joins the multi-process runtime if asked and emulates CPU devices; returns the global
    device count. RunError if the coordinator cannot be joined in ``run.init_timeout`` seconds."""
    use_cpu_devices(run.cpu_devices)
    if run.distributed:
        where = f"the coordinator at {run.coordinator}" if run.coordinator else "the cluster"
        message = (f"error: could not join {where} within run.init_timeout={run.init_timeout} s "
                   "(is process 0 running and reachable, and did every process start?)")
        # JAX aborts the process with a C++ stack trace when joining times out: say it first.
        watchdog = threading.Timer(max(run.init_timeout - 1.0, 0.9 * run.init_timeout),
                                   lambda: (print(message, file=sys.stderr), exit_now(1)))
        watchdog.daemon = True
        watchdog.start()
        try:
            initialize_distributed(run.coordinator, run.num_processes, run.process_id,
                                   run.init_timeout, run.heartbeat_timeout)
        except Exception as e:  # noqa: BLE001 -- refusals come as several types
            raise RunError(f"{message[len('error: '):]}: {first_line(e)}") from None
        finally:
            watchdog.cancel()
    return jax.device_count()


def exit_now(code: int) -> None:
    """Leaves without JAX's distributed shutdown, whose barrier would wait for a dead peer."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
