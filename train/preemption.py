"""SIGTERM means: stop after the current step, save, exit 0 (a preemption notice on a TPU VM)."""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils


class Preemption:
    """In one process a SIGTERM handler sets a flag; under ``jax.distributed`` JAX's preemption
    sync manager catches the signal and every process reaches the same sync step
    (``reached_preemption_sync_point``)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: Any = None
        # jax.distributed.initialize starts the sync manager (jax_enable_preemption_service).
        self.sync_manager = jax.distributed.is_initialized()

    def __enter__(self) -> Preemption:
        if not self.sync_manager and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def requested(self, step: int) -> bool:
        """Whether to stop after ``step``; the same answer on every process."""
        if self.sync_manager:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal is not None
