"""The training loop: build the mesh and sharded state (or resume it), jit the steps once, then
run -- batches in, bounded steps in flight, metrics out, asynchronous checkpoints, a final
evaluation and a short sample.

Reliability: SIGTERM (or JAX's preemption notice under ``jax.distributed``) finishes the current
step, saves, waits for the commit and returns (exit 0); the next start resumes from the newest
checkpoint that verifies (damaged ones are moved aside). Steps with a non-finite loss or gradient
norm are skipped inside the jitted step and counted; more than ``train.max_skipped_steps`` in a row
stop the run (RunError). A checkpoint is never written from a non-finite state.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from data.batches import equalize_across_processes, to_global
from data.pipeline import Shard, empty_batch, eval_batches, regroup_state, train_dataset
from data.sources import open_source
from data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer, make_tokenizer, save_tokenizer
from eval.generate import generate
from model.flops import param_counts, peak_flops
from sharding.constrain import activation_sharding
from sharding.mesh import broadcast_from_0, make_mesh, sync_processes
from sharding.rules import default_rules
from train.checkpoint import Checkpointer, CheckpointWriteError, DamagedRunFileError, warn
from train.config import Config, ConfigError, RunError, dump_yaml
from train.metrics import MetricsWriter, progress_bar, write_expert_load_png
from train.optimizer import make_optimizer
from train.step import batch_sharding, jit_all_finite
from train.trainee import Trainee

# (step, this process's batch) -> batch: a test hook, e.g. to feed a NaN batch.
BatchHook = Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]


def prepare_run_dir(cfg: Config) -> Path:
    """Creates the run directory, or checks that an existing one trained the same model."""
    run_dir = Path(cfg.run.dir)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            previous = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError:
            raise ConfigError("run.dir", f"{saved} is not valid YAML") from None
        defaults = Config().to_dict()["model"]  # keys added since that run take their defaults
        if {**defaults, **(previous.get("model") or {})} != cfg.to_dict()["model"]:
            raise ConfigError("run.dir", f"{run_dir} holds a run of a different model; choose "
                              "another run.dir or keep the model.* settings")
    sync_processes("meshlm: run directory checked")  # every process read it before it changes
    problem = ""
    if jax.process_index() == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(saved, dump_yaml(cfg).encode())
        except OSError as e:
            problem = f"cannot write to {run_dir}: {e.strerror or e}"
    if broadcast_from_0(1 if problem else 0):  # the others must not wait for process 0 forever
        raise ConfigError("run.dir", problem or "process 0 cannot write to the run directory")
    return run_dir


def write_atomically(path: Path, data: bytes) -> None:
    """Writes ``path`` through a temporary file and a rename: a crash leaves the old or the new."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def trim_metrics(run_dir: Path, step: int) -> None:
    """On resume: drops records past ``step`` (they are trained again) and any torn last line
    from ``metrics.jsonl`` (process 0)."""
    path = run_dir / "metrics.jsonl"
    if jax.process_index() != 0 or not path.is_file():
        return
    kept = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            kept.append(line + "\n")
    write_atomically(path, "".join(kept).encode())


def run_tokenizer(cfg: Config, run_dir: Path) -> Tokenizer:
    """The run's tokenizer: the one saved in the run directory when resuming, else a new one."""
    resuming = (run_dir / TOKENIZER_FILE).is_file()
    sync_processes("meshlm: tokenizer looked up")  # before process 0 may write it
    if resuming:
        return load_tokenizer(run_dir)
    tokenizer = make_tokenizer(cfg.data.tokenizer)
    if jax.process_index() == 0:  # via a scratch directory: a crash never leaves half a file
        scratch = run_dir / ".tokenizer.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        save_tokenizer(tokenizer, scratch)
        for name in sorted(os.listdir(scratch), key=lambda n: n == TOKENIZER_FILE):  # .json last
            os.replace(scratch / name, run_dir / name)
        scratch.rmdir()
    return tokenizer


class Preemption:
    """SIGTERM means: stop after the current step, save, exit 0. In one process a handler sets a
    flag; under ``jax.distributed`` JAX's preemption sync manager catches the signal and every
    process reaches the same sync step (``reached_preemption_sync_point``)."""

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
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal is not None


def data_streams(cfg: Config, tokenizer) -> tuple[Any, list]:
    """(training batch iterator, evaluation batches) of this process's rows."""
    d, t = cfg.data, cfg.train
    shard = Shard(jax.process_index(), jax.process_count())
    local_batch = t.batch_size // shard.count
    kwargs = {"eval_fraction": d.eval_fraction, "data_dir": d.data_dir or None,
              "cache_dir": d.cache_dir or None}

    def open_splits() -> tuple:
        return open_source(d.source, "train", **kwargs), open_source(d.source, "eval", **kwargs)

    if shard.index == 0:  # process 0 prepares text: sources once; the others then reuse them
        train_docs, eval_docs = open_splits()
    sync_processes("meshlm: data sources prepared")
    if shard.index != 0:
        train_docs, eval_docs = open_splits()
    iterator = iter(train_dataset(train_docs, tokenizer, seq_len=t.seq_len, batch_size=local_batch,
                                  seed=t.seed, shard=shard, streams=d.streams,
                                  prefetch=d.prefetch, shuffle_tokens=d.shuffle_tokens))
    batches = eval_batches(eval_docs, tokenizer, seq_len=t.seq_len, batch_size=local_batch,
                           max_batches=t.eval_batches, shard=shard)
    return iterator, equalize_across_processes(batches, empty_batch(local_batch, t.seq_len))


def evaluate(eval_step, params, batches, batch_sh, batch_size) -> float:
    """Mean token loss over the evaluation batches."""
    loss_sum = weight_sum = 0.0
    for local in batches:
        out = jax.device_get(eval_step(params, to_global(local, batch_sh, batch_size)))
        loss_sum += float(out["loss_sum"])
        weight_sum += float(out["weight_sum"])
    return loss_sum / max(weight_sum, 1.0)


def train(cfg: Config, *, batch_hook: BatchHook | None = None) -> dict[str, Any]:
    """Runs (or resumes) the job described by ``cfg``; returns a summary of the last step
    (``preempted`` is the step it stopped at after SIGTERM). ``batch_hook`` is for tests."""
    with Preemption() as preemption:
        return _train(cfg, preemption, batch_hook)


def _train(cfg: Config, preemption: Preemption, batch_hook: BatchHook | None) -> dict[str, Any]:
    run_dir = prepare_run_dir(cfg)
    mesh, rules = make_mesh(cfg.mesh), default_rules()
    t, m = cfg.train, cfg.model
    sync_processes("meshlm: run directory prepared")
    try:
        tokenizer = run_tokenizer(cfg, run_dir)
        batches, eval_data = data_streams(cfg, tokenizer)
    except ValueError as e:  # unreadable files, empty globs, unknown datasets: the user's input
        raise ConfigError("data", str(e)) from None
    tx, schedule = make_optimizer(cfg.optim, t.steps)
    writer = MetricsWriter(run_dir, cfg.run.tensorboard)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)

    with activation_sharding(mesh, rules):
        trainee = make_trainee(cfg, tx, mesh, rules)
        state_sh = trainee.shardings
        try:
            start = checkpointer.resume_step() or 0
        except DamagedRunFileError as e:
            raise ConfigError("run.dir", str(e)) from None
        trim_metrics(run_dir, start)
        if start:
            try:
                saved, meta, data_states = checkpointer.restore(start, *trainee.checkpoint_abstract)
                state = trainee.from_checkpoint(saved, meta)
                shard = Shard(jax.process_index(), jax.process_count())
                batches.set_state(regroup_state(data_states, shard, cfg.data.streams))
            except ValueError as e:
                raise ConfigError("run.dir", f"cannot resume from checkpoint {start}: "
                                  f"{str(e).splitlines()[0]}") from None
        else:
            state = trainee.init()
        batch_sh = batch_sharding(mesh, rules, t.batch_size, t.seq_len)
        train_step, eval_step = trainee.jit_steps(schedule, batch_sh)
        state_finite = jit_all_finite(state_sh, mesh)
        state_bytes = sum(x.size * x.dtype.itemsize
                          for x in jax.tree.leaves(trainee.checkpoint_abstract[0]))

        def save(step: int) -> None:
            """Saves ``state`` as checkpoint ``step``: never a non-finite state, and a failed or
            impossible write ends the run with one line (its temporary directory is ignored)."""
            drain(0)  # count skipped steps first (the finiteness check below waits anyway)
            if not bool(jax.device_get(state_finite(state))):
                raise RunError(f"refusing to save checkpoint {step}: the training state holds "
                               "non-finite values")
            try:
                checkpointer.save(step, trainee.to_checkpoint(state),
                                  {"step": step, **trainee.checkpoint_meta()}, batches.get_state(),
                                  need_bytes=state_bytes)
            except CheckpointWriteError as e:  # the previous, asynchronous save failed
                raise RunError(str(e)) from None
            except Exception as e:  # orbax and tensorstore raise many types for I/O failures
                raise RunError(f"checkpoint {step} could not be written: {first_line(e)}") from None

        def commit() -> None:
            """Waits until the pending save is committed."""
            try:
                checkpointer.wait()
            except CheckpointWriteError as e:
                raise RunError(str(e)) from None

        peak, peak_source = peak_flops(cfg.run.peak_flops)
        flops_per_token = trainee.flops_per_token()
        tokens_per_step = t.batch_size * t.seq_len
        counts = param_counts(m)
        if jax.process_index() == 0:
            active = f" ({counts['active'] / 1e6:.2f}M active)" if m.is_moe else ""
            print(f"meshlm: {counts['total'] / 1e6:.2f}M parameters{active} on mesh "
                  f"{dict(mesh.shape)} ({jax.device_count()} {jax.default_backend()} devices); "
                  f"steps {start}->{t.steps}; peak {peak / 1e9:.1f} GFLOP/s ({peak_source}); "
                  f"run dir {run_dir}", flush=True)
        if trainable := trainee.trainable_counts():
            report_trainable(writer, start, *trainable)

        bar = progress_bar(t.steps, start, cfg.run.progress)
        in_flight: collections.deque[tuple[int, dict]] = collections.deque()
        last: dict[str, Any] = {"step": start}
        clock = {"time": None, "step": start}
        load_sum = {"total": 0.0, "steps": 0}  # MoE: summed [MoE layers, experts] load, for the picture
        skips = {"total": 0, "run": 0}  # non-finite steps skipped: in all, and the latest streak

        def drain(limit: int) -> None:
            """Fetches metrics of the oldest steps until at most ``limit`` remain in flight."""
            while len(in_flight) > limit:
                step, metrics = in_flight.popleft()
                values = {k: v.tolist() if np.ndim(v) else float(v)  # MoE per-layer lists
                          for k, v in jax.device_get(metrics).items()}
                check_skipped(step, values)
                if "expert_load" in values:
                    load_sum["total"] = load_sum["total"] + np.asarray(values["expert_load"])
                    load_sum["steps"] += 1
                now = time.perf_counter()
                bar.update(1)
                last.update(step=step, **values)
                if clock["time"] is None:  # the first step includes compilation: time from here
                    clock.update(time=now, step=step)
                if step % t.log_every == 0 or step == t.steps:
                    elapsed = now - clock["time"]
                    tps = (step - clock["step"]) * tokens_per_step / elapsed if elapsed > 0 else 0.0
                    mfu = tps * flops_per_token / peak if peak else 0.0
                    last.update(tokens_per_s=tps, mfu=mfu)
                    writer.write({"step": step, **values, "tokens_per_s": tps, "mfu": mfu,
                                  "skipped_steps": skips["total"]})
                    bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{tps:,.0f}",
                                    mfu=f"{mfu:.1%}")
                    clock.update(time=now, step=step)

        def check_skipped(step: int, values: dict[str, Any]) -> None:
            """Counts skipped (non-finite) steps; too many in a row end the run."""
            if not values.get("skipped"):
                skips["run"] = 0
                return
            skips["total"] += 1
            skips["run"] += 1
            warn(f"step {step}: non-finite loss ({values['loss']}) or gradient norm "
                 f"({values['grad_norm']}); update skipped ({skips['run']} in a row)")
            if skips["run"] > t.max_skipped_steps:
                raise RunError(f"stopped at step {step}: {skips['run']} steps in a row had a "
                               f"non-finite loss or gradient norm (train.max_skipped_steps="
                               f"{t.max_skipped_steps}); the last checkpoint is "
                               f"{checkpointer.latest_step() or 'none'}")

        try:
            stopped = None
            for step in range(start, t.steps):
                local = next(batches)
                if batch_hook is not None:
                    local = batch_hook(step + 1, local)
                state, metrics = train_step(state, to_global(local, batch_sh, t.batch_size))
                in_flight.append((step + 1, metrics))
                drain(t.steps_in_flight)
                done = step + 1
                if preemption.requested(done):
                    stopped = done
                    break
                if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != t.steps:
                    save(done)
                if t.eval_every and done % t.eval_every == 0 and done != t.steps and eval_data:
                    drain(0)
                    eval_loss = evaluate(eval_step, state.params, eval_data, batch_sh, t.batch_size)
                    writer.write({"step": done, "eval_loss": eval_loss})
            drain(0)
            bar.close()
            final_step = stopped or max(start, t.steps)  # a resumed run past train.steps stops
            if checkpointer.latest_step() != final_step:
                save(final_step)
            commit()
        except RunError:
            if jax.process_count() == 1:  # a pending save holds a good state: let it commit
                try:
                    checkpointer.close()
                except Exception:  # noqa: BLE001 -- the RunError is the message to show
                    pass
            writer.close()
            batches.close()
            raise
        last["skipped_steps"] = skips["total"]
        if stopped is not None:
            checkpointer.close()
            writer.close()
            batches.close()
            if jax.process_index() == 0:
                print(f"meshlm: stopped by SIGTERM after step {stopped} of {t.steps}; checkpoint "
                      f"{stopped} is committed in {checkpointer.directory}; run the same command "
                      "to resume", flush=True)
            last["preempted"] = stopped
            return last
        if eval_data:
            last["eval_loss"] = evaluate(eval_step, state.params, eval_data, batch_sh, t.batch_size)
            writer.write({"step": final_step, "eval_loss": last["eval_loss"]})
        if load_sum["steps"] and jax.process_index() == 0:
            moe_layer_ids = [m.first_dense_layers + (i + 1) * m.moe_every - 1
                             for i in range(m.num_moe_layers)]
            write_expert_load_png(run_dir / "expert_load.png", load_sum["total"] / load_sum["steps"],
                                  moe_layer_ids, f"expert load, mean over steps "
                                  f"{final_step - load_sum['steps'] + 1}-{final_step} "
                                  f"({m.num_experts} experts, top-{m.experts_per_token})")
        checkpointer.close()
        writer.close()
        batches.close()

        if t.sample_tokens:  # every process takes part (params span them); process 0 prints
            print_sample(cfg, *trainee.plain_model(state), tokenizer)
    return last


def make_trainee(cfg: Config, tx, mesh, rules) -> Trainee:
    """Pre-training, or a fine-tune of ``finetune.base``."""
    if cfg.finetune.base:
        from train.finetune_state import FinetuneTrainee

        return FinetuneTrainee(cfg, tx, mesh, rules)
    return Trainee(cfg, tx, mesh, rules)


def report_trainable(writer: MetricsWriter, step: int, trainable: int, total: int) -> None:
    """Prints and logs the trained share of the parameters (process 0)."""
    if jax.process_index() == 0:
        print(f"meshlm: trainable {trainable / total:.2%} ({trainable:,} of {short_count(total)})",
              flush=True)
    writer.write({"step": step, "trainable_params": trainable, "total_params": total,
                  "trainable_fraction": trainable / total})


def short_count(n: int) -> str:
    """29.1M, 3.4M, 41.2K: a parameter count in three significant figures or so."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def print_sample(cfg: Config, graphdef, params, tokenizer) -> None:
    prompt = cfg.train.sample_prompt
    ids = ([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + tokenizer.encode(prompt)
    new = list(generate(params, graphdef, ids, cfg.train.sample_tokens,
                        window=cfg.train.seq_len, temperature=0.8, seed=cfg.train.seed,
                        stop_id=tokenizer.eos_id))
    if jax.process_index() != 0:
        return
    print("--- sample (temperature 0.8) ---")
    print(prompt + tokenizer.decode(new))
    print("--- end of sample ---", flush=True)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type name)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def losses_of(run_dir: str | Path) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl (the last record of a step wins)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[int(record["step"])] = record["loss"]
    return out

