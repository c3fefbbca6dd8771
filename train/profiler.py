"""A ``jax.profiler`` trace of the training steps ``train.profile=START:END`` names, written where
TensorBoard's profile plugin (xprof) looks: ``<run.dir>/tensorboard/plugins/profile/<time>/
<host>.xplane.pb`` (``RunDir.profile_log_dir``). Every process traces itself.

The trace starts before step START's batch is read, once the steps before it have finished (so it
holds no earlier step), and stops once step END's outputs are ready (so it holds that step's
execution, not only its dispatch). A resumed run traces the steps of the range that it runs; a run
that stops inside the range (SIGTERM, a failure) ends the trace with what it holds. For a run on an
object store the trace is written to a local scratch directory and uploaded when it stops (JAX's
profiler writes through its own filesystem layer, which knows no S3)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax

from train.store import RunPath, is_remote, upload_tree


class StepProfiler:
    """Starts and stops one trace around the steps ``steps`` = (START, END), or does nothing. Each
    traced step is marked as xprof's step markers are (``jax.profiler.StepTraceAnnotation("train",
    step_num=step)``, from reading its batch to its dispatch), so the profile's tools see steps."""

    def __init__(self, steps: tuple[int, int] | None, log_dir: RunPath):
        self.steps, self.log_dir = steps, log_dir
        self.scratch: Path | None = None  # where the trace goes first, for an object store
        self.tracing = self.done = False
        self.marker: jax.profiler.StepTraceAnnotation | None = None

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def before(self, step: int, in_flight: Any) -> None:
        """Called before step ``step`` reads its batch: starts the trace at the first step of the
        range this run reaches, after waiting for ``in_flight`` (the outputs of the step before)."""
        if self.steps is None or self.done:
            return
        if not self.tracing and self.steps[0] <= step <= self.steps[1]:
            jax.block_until_ready(in_flight)
            if is_remote(self.log_dir):
                self.scratch = Path(tempfile.mkdtemp(prefix="meshlm-trace-"))
            target = self.scratch or self.log_dir
            target.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(target))
            self.tracing = True
        if self.tracing:
            self.marker = jax.profiler.StepTraceAnnotation("train", step_num=step)
            self.marker.__enter__()

    def after(self, step: int, outputs: Any) -> None:
        """Called after step ``step`` is dispatched: at END, waits for ``outputs`` and stops."""
        if self.marker is not None:
            self.marker.__exit__(None, None, None)
            self.marker = None
        if self.tracing and step == self.steps[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops the trace, if one runs, and writes it."""
        if self.marker is not None:
            self.marker.__exit__(None, None, None)
            self.marker = None
        if self.tracing:
            self.tracing, self.done = False, True
            jax.profiler.stop_trace()
            if self.scratch is not None:
                upload_tree(self.scratch, self.log_dir)
                shutil.rmtree(self.scratch, ignore_errors=True)
