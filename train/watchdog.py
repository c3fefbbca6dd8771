"""The hang watchdog: a step that takes longer than ``run.step_timeout`` ends the process with one
``error:`` line naming the process and the step (a hung collective or runtime cannot be unwound by
an exception, so it leaves with ``os._exit``). Every process runs its own: when one host hangs, its
peers wait in a collective for it and their watchdogs end them too.

It watches only stepping. The loop tells it when a step came back (``progress``, after each
``StepLog.push``) and pauses it around checkpoint saves and evaluations; it arms at the first step
that comes back, so compilation is never timed, and the loop stops it before the final save, its
commit and the end-of-run hooks. ``StepLimit`` holds the limit: an explicit one applies from the
first step after compilation; the automatic one (``run.step_timeout=0``) from the end of warm-up.
"""

from __future__ import annotations

import collections
import contextlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax

from core.errors import RUN_EXIT
from train.metrics import StepLog

AUTOMATIC, NEVER = 0.0, -1.0
TIMES_MEDIAN = 10.0
# The automatic limit's floor. Steps of milliseconds (small models, the CPU) would otherwise get a
# limit of a fraction of a second, tripped by stalls that are not hangs and do not scale with the
# step: a garbage collection of a large host heap, the input pipeline opening its next shard or
# reconnecting a stream, the background checkpoint writer competing for the host's cores and disk,
# a busy shared machine. Those take seconds, rarely tens of seconds; a real hang lasts until the
# job is killed (hours of a pod), so a minute costs nothing and keeps false alarms out.
FLOOR_S = 60.0
WARMUP_STEPS = 3  # steps timed after the first (compiling) one and ignored: caches still fill
MIN_SAMPLES = 5  # step times needed after warm-up before an automatic limit exists
WINDOW = 200  # the median is over the latest step times: a run that slows down stays covered


class StepLimit:
    """The limit on one step, from ``run.step_timeout`` and the step times seen so far (seconds
    per step between two points where steps came back). Pure Python: no JAX, no clock."""

    def __init__(self, step_timeout: float):
        self.setting = step_timeout
        self.warmup_left = WARMUP_STEPS
        self.step_times: collections.deque[float] = collections.deque(maxlen=WINDOW)

    def observe(self, seconds: float, steps: int) -> None:
        """``steps`` steps came back in ``seconds`` (after the first, compiling, step)."""
        for _ in range(steps):
            if self.warmup_left:
                self.warmup_left -= 1
            else:
                self.step_times.append(seconds / steps)

    def seconds(self) -> float | None:
        """The limit now, or None while there is none (never; automatic and still warming up)."""
        if self.setting == NEVER:
            return None
        if self.setting != AUTOMATIC:
            return self.setting
        if len(self.step_times) < MIN_SAMPLES:
            return None
        return max(FLOOR_S, TIMES_MEDIAN * statistics.median(self.step_times))

    def describe(self) -> str:
        """Where the limit comes from, for the error line."""
        if self.setting != AUTOMATIC:
            return f"run.step_timeout={self.setting:g}"
        median = statistics.median(self.step_times)
        return (f"run.step_timeout=0: automatic, {TIMES_MEDIAN:g}x the median step of {median:.3g} s, "
                f"at least {FLOOR_S:g} s")


class Watchdog:
    """A daemon thread that ends the process when no step has come back for longer than the limit
    (see the module docstring). A context manager: leaving it stops the thread."""

    def __init__(self, step_timeout: float, log: StepLog):
        self.limit, self.log = StepLimit(step_timeout), log
        self.process, self.processes = jax.process_index(), jax.process_count()
        self.lock = threading.Lock()
        self.since: float | None = None  # when a step last came back (or stepping resumed); None = unarmed
        self.step = self.first = log.last["step"]  # the last step that came back; the start's
        self.anchored = False  # whether ``since`` is a point where a step came back (not a resumption)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="meshlm-step-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        if self.limit.setting != NEVER:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Ends the watch for good (before the final save and the end-of-run work)."""
        self.stopped.set()

    def progress(self) -> None:
        """Called after each push: notes the steps that came back since the last call."""
        step, now = self.log.last["step"], time.monotonic()
        with self.lock:
            if step == self.step:
                return
            if self.since is not None and self.anchored:
                self.limit.observe(now - self.since, step - self.step)
            self.step, self.since, self.anchored = step, now, True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Not watching inside (a save, an evaluation); the clock starts again when it ends."""
        with self.lock:
            self.since = None
        try:
            yield
        finally:
            with self.lock:  # armed once a step came back (here too: a save fetches the last ones)
                self.step = self.log.last["step"]
                self.since = time.monotonic() if self.step != self.first else None
                self.anchored = False

    def _watch(self) -> None:
        poll_s = 1.0
        while not self.stopped.wait(poll_s):
            with self.lock:  # the loop appends step times
                since, limit = self.since, self.limit.seconds()
            poll_s = 1.0 if limit is None else min(1.0, max(0.05, limit / 20))
            overdue = since is not None and limit is not None and time.monotonic() - since > limit
            if overdue and not self.stopped.is_set():
                self._end(limit)

    def _end(self, limit: float) -> None:
        """One error line naming this process and the step it waits for, then exit at once."""
        with self.lock:
            why = self.limit.describe()
        newline = "" if self.log.bar.disable else "\n"  # after the progress bar's unfinished line
        print(f"{newline}error: process {self.process} of {self.processes}: step "
              f"{self._waiting_for()} did not finish within {limit:g} s ({why}; -1 = never); the "
              "run hung or a host stalled: run the same command to resume from the last checkpoint",
              file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(RUN_EXIT)

    def _waiting_for(self) -> int:
        """The oldest step in flight whose outputs are not ready, or else the step after the last
        one dispatched (the host is stuck before dispatching it: input, a hook)."""
        in_flight: list[tuple[int, Any]] = list(self.log.in_flight)  # a copy: the loop appends
        for step, metrics in in_flight:
            if not all(x.is_ready() for x in jax.tree.leaves(metrics)):
                return step
        return (in_flight[-1][0] if in_flight else self.log.last["step"]) + 1
