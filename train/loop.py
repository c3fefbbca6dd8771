"""The training loop: prepare the run directory, build the sharded program, start from step 0 or
resume the newest good checkpoint, then run -- batches in, bounded steps in flight, metrics out,
asynchronous checkpoints -- and end with an evaluation and the caller's end-of-run hooks (the MoE
expert-load picture, a sample).

Reliability: one trainer per run directory (``RunDir.locked``, held for the whole run). SIGTERM (or
JAX's preemption notice under ``jax.distributed``) finishes the current step, saves, waits for the
commit and returns (exit 0); the next start resumes from the newest checkpoint that verifies
(damaged ones are moved aside; when none does, the run refuses to start again unless
``checkpoint.restart_if_damaged``). Steps with a non-finite loss or gradient norm are skipped
inside the jitted step and counted; more than ``train.max_skipped_steps`` in a row stop the run
(RunError). A checkpoint is never written from a non-finite state. A step that takes longer than
``run.step_timeout`` ends the process with one line (``train.watchdog``; every process has one).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from core.errors import ConfigError, RunError, first_line
from data.tokenizer import Tokenizer
from model.flops import param_counts, peak_flops
from sharding.mesh import sync_processes
from train.checkpoint import (
    Checkpointer,
    CheckpointWriteError,
    DamagedRunFileError,
    NoUsableCheckpointError,
)
from train.config import Config
from train.inputs import open_inputs, resume_position
from train.metrics import MetricsWriter, StepLog, write_expert_load_png
from train.preemption import Preemption
from train.profiler import StepProfiler
from train.program import Program
from train.run_dir import RunDir
from train.state import TrainState
from train.watchdog import Watchdog

# (step, this process's batch) -> batch: a test hook, e.g. to feed a NaN batch.
BatchHook = Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclasses.dataclass
class RunEnd:
    """What an end-of-run hook gets: the finished run and its final state (every process calls
    the hooks; the parameters span them all)."""

    cfg: Config
    run: RunDir
    program: Program
    state: TrainState
    tokenizer: Tokenizer
    summary: dict[str, Any]
    expert_load: np.ndarray | None  # [MoE layers, experts]: mean over the steps of this start
    load_steps: int


EndHook = Callable[[RunEnd], None]


def write_expert_load_picture(end: RunEnd) -> None:
    """``expert_load.png`` in the run directory: an MoE run's mean expert load per layer."""
    m = end.cfg.model
    if end.expert_load is None or jax.process_index() != 0:
        return
    step = end.summary["step"]
    write_expert_load_png(end.run.expert_load_picture, end.expert_load, m.moe_layer_indices,
                          f"expert load, mean over steps {step - end.load_steps + 1}-{step} "
                          f"({m.num_experts} experts, top-{m.experts_per_token})")


def train(cfg: Config, *, hooks: Sequence[EndHook] = (write_expert_load_picture,),
          batch_hook: BatchHook | None = None) -> dict[str, Any]:
    """Runs (or resumes) the job described by ``cfg``; returns a summary of the last step
    (``preempted`` is the step it stopped at after SIGTERM; then no hooks run). ``hooks`` run at
    the end: ``python -m train`` adds the sample of ``train.sample_tokens`` tokens
    (``inference.generate.print_sample``, a layer above this one). ``batch_hook`` is for tests."""
    with RunDir(cfg.run.dir).locked(cfg.run.lock_ttl):  # before the directory is touched; hooks write
        with Preemption() as preemption:
            end = _train(cfg, preemption, batch_hook)
        if "preempted" not in end.summary:
            for hook in hooks:
                hook(end)
    return end.summary


def _train(cfg: Config, preemption: Preemption, batch_hook: BatchHook | None) -> RunEnd:
    run = RunDir(cfg.run.dir)
    run.prepare(cfg)
    sync_processes("meshlm: run directory prepared")
    with _Closing() as cleanup:
        tokenizer, batches, eval_data = open_inputs(cfg, run)
        cleanup.callback(batches.close)
        program = Program(cfg)
        writer = cleanup.enter_context(MetricsWriter(run, cfg))
        checkpointer = cleanup.enter_context(_committing(Checkpointer(run.path, cfg.checkpoint)))
        state, start = _resume_or_init(program, checkpointer, run, batches)
        log = StepLog(cfg, writer, start, program.trainee.flops_per_token(),
                      _announce(cfg, program, run, writer, start), checkpointer.latest_step)
        cleanup.callback(log.close)
        watchdog = cleanup.enter_context(Watchdog(cfg.run.step_timeout, log))
        trace_dir = run.profile_log_dir(jax.process_index(), jax.process_count())
        profiler = cleanup.enter_context(StepProfiler(cfg.train.profile_steps(), trace_dir))
        steps = _Steps(cfg, program, checkpointer, batches, eval_data, writer, log, watchdog,
                       profiler)
        state, stopped = steps.run(state, start, preemption, batch_hook)
        summary = {**log.last, "skipped_steps": log.skipped_total}
        if stopped is not None:
            summary["preempted"] = stopped
        elif eval_data:
            evaluation = program.eval_metrics(state.params, eval_data)
            summary |= evaluation
            writer.write({"step": summary["step"], **evaluation})
    if stopped is not None and jax.process_index() == 0:
        print(f"meshlm: stopped by SIGTERM after step {stopped} of {cfg.train.steps}; checkpoint "
              f"{stopped} is committed in {checkpointer.directory}; run the same command to "
              "resume", flush=True)
    load = log.load_sum / log.load_steps if log.load_steps else None
    return RunEnd(cfg, run, program, state, tokenizer, summary, load, log.load_steps)


@dataclasses.dataclass
class _Steps:
    """What one start of a run steps with: the program, the checkpointer, this process's data and
    where metrics go."""

    cfg: Config
    program: Program
    checkpointer: Checkpointer
    batches: Any  # the training iterator (its position is saved with every checkpoint)
    eval_data: list
    writer: MetricsWriter
    log: StepLog
    watchdog: Watchdog  # armed while stepping: paused around saves and evaluations
    profiler: StepProfiler  # train.profile: a trace of some steps

    def run(self, state: TrainState, start: int, preemption: Preemption,
            batch_hook: BatchHook | None) -> tuple[TrainState, int | None]:
        """Steps from ``start`` to ``train.steps`` with periodic checkpoints and evaluations; the
        final checkpoint is committed before this returns. (state, the step SIGTERM stopped at or
        None)."""
        t, every, program = self.cfg.train, self.cfg.checkpoint.every, self.program
        stopped = None
        for step in range(start + 1, t.steps + 1):
            self.profiler.before(step, state)
            local = next(self.batches)
            if batch_hook is not None:
                local = batch_hook(step, local)
            state, metrics = program.train_step(state, program.global_batch(local))
            self.profiler.after(step, (state, metrics))
            self.log.push(step, metrics)
            self.watchdog.progress()
            if preemption.requested(step):
                stopped = step
                break
            if every and step % every == 0 and step != t.steps:
                with self.watchdog.paused():
                    self.save(state, step)
            if t.eval_every and step % t.eval_every == 0 and step != t.steps and self.eval_data:
                with self.watchdog.paused():
                    self.log.drain()
                    self.writer.write({"step": step,
                                       **program.eval_metrics(state.params, self.eval_data)})
        self.log.drain()
        self.watchdog.stop()  # the final save, its commit and the end-of-run work are not steps
        final_step = stopped or max(start, t.steps)  # a resumed run past train.steps stops
        if self.checkpointer.latest_step() != final_step:
            self.save(state, final_step)
        try:
            self.checkpointer.wait()
        except CheckpointWriteError as e:
            raise RunError(str(e)) from None
        return state, stopped

    def save(self, state: TrainState, step: int) -> None:
        """Saves ``state`` as checkpoint ``step``: never a non-finite state, and a failed or
        impossible write ends the run with one line (its temporary directory is ignored)."""
        self.log.drain()  # count skipped steps first (the finiteness check below waits anyway)
        self.writer.flush()  # the records up to this step are durable before it can be resumed
        if not self.program.state_finite(state):
            raise RunError(f"refusing to save checkpoint {step}: the training state holds "
                           "non-finite values")
        trainee = self.program.trainee
        need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainee.checkpoint_abstract[0]))
        try:
            self.checkpointer.save(step, trainee.to_checkpoint(state),
                                   {"step": step, **trainee.checkpoint_meta()},
                                   self.batches.get_state(), need_bytes=need)
        except CheckpointWriteError as e:  # the previous, asynchronous save failed
            raise RunError(str(e)) from None
        except Exception as e:  # orbax and tensorstore raise many types for I/O failures
            raise RunError(f"checkpoint {step} could not be written: {first_line(e)}") from None


def _resume_or_init(program: Program, checkpointer: Checkpointer, run: RunDir,
                    batches: Any) -> tuple[TrainState, int]:
    """(state, step): the newest checkpoint that verifies, restored onto the program's mesh with
    the input position it saved, or the state of step 0. Metrics past that step are archived."""
    try:
        start = checkpointer.resume_step() or 0
    except (DamagedRunFileError, NoUsableCheckpointError) as e:
        raise ConfigError("run.dir", str(e)) from None
    run.trim_metrics(start)
    if not start:
        return program.init(), 0
    trainee = program.trainee
    try:
        saved, meta, data_states = checkpointer.restore(start, *trainee.checkpoint_abstract)
        state = trainee.from_checkpoint(saved, meta)
        resume_position(batches, data_states, program.cfg.data)
    except ValueError as e:
        raise ConfigError("run.dir", f"cannot resume from checkpoint {start}: {first_line(e)}") from None
    return state, start


class _Closing(contextlib.ExitStack):
    """Closes what a run opened, in reverse order, however the run ends -- except after a failure
    with several processes: the peers may be gone and a close could wait for them, so everything is
    left as it is and the command ends the process at once."""

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None and jax.process_count() > 1:
            self.pop_all()
            return False
        return super().__exit__(exc_type, exc, tb)


@contextlib.contextmanager
def _committing(checkpointer: Checkpointer) -> Iterator[Checkpointer]:
    """Closes the checkpointer when the run ends, waiting for a pending save: after a failure too
    (that save holds a good state), quietly (the failure is the message to show)."""
    try:
        yield checkpointer
    except GeneratorExit:  # dropped unclosed by _Closing after a failure with several processes:
        raise  # the pending save's commit waits on the peers, which may be dead; wait for nothing
    except BaseException:
        with contextlib.suppress(Exception):
            checkpointer.close()
        raise
    checkpointer.close()


def _announce(cfg: Config, program: Program, run: RunDir, writer: MetricsWriter, start: int) -> float:
    """Prints the start-up line (and a fine-tune's trainable share); returns the peak FLOP/s that
    MFU is measured against."""
    peak, peak_source = peak_flops(cfg.run.peak_flops)
    counts, m = param_counts(cfg.model), cfg.model
    if jax.process_index() == 0:
        active = f" ({counts['active'] / 1e6:.2f}M active)" if m.is_moe else ""
        print(f"meshlm: {counts['total'] / 1e6:.2f}M parameters{active} on mesh "
              f"{dict(program.mesh.shape)} ({jax.device_count()} {jax.default_backend()} devices); "
              f"steps {start}->{cfg.train.steps}; peak {peak / 1e9:.1f} GFLOP/s ({peak_source}); "
              f"run dir {run.path}", flush=True)
    if trainable := program.trainee.trainable_counts():
        trained, total = trainable
        if jax.process_index() == 0:
            print(f"meshlm: trainable {trained / total:.2%} ({trained:,} of {short_count(total)})",
                  flush=True)
        writer.write({"step": start, "trainable_params": trained, "total_params": total,
                      "trainable_fraction": trained / total})
    return peak


def short_count(n: int) -> str:
    """29.1M, 3.4M, 41.2K: a parameter count in three significant figures or so."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
