"""Reliability: SIGTERM saves and resumes exactly, SIGKILL at any moment (also during an async save)
resumes from a committed checkpoint, non-finite steps are skipped and never checkpointed, damaged
checkpoints are detected and passed over, and failures end the run with one line."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train.checkpoint as checkpoint_module
from core.errors import ConfigError, RunError
from tests.helpers import SMALL, losses_of, random_batch, tiny_config
from train.checkpoint import (
    MANIFEST,
    TMP_SUFFIX,
    Checkpointer,
    DamagedCheckpointError,
    DamagedRunFileError,
)
from train.config import OptimConfig
from train.loop import train
from train.optimizer import make_optimizer
from train.run_dir import DAMAGED_DIR
from train.state import abstract_state, init_state
from train.step import train_step
from train.watchdog import FLOOR_S, MIN_SAMPLES, WARMUP_STEPS, StepLimit

ROOT = Path(__file__).resolve().parent.parent
STEPS = 24
# Every 4 steps a checkpoint (2 kept): kills often land inside an asynchronous save.
OVERRIDES = (f"train.steps={STEPS}", "checkpoint.every=4", "checkpoint.keep=2", "train.log_every=1",
             f"optim.decay_steps={STEPS}", "optim.warmup_steps=4", "run.tensorboard=false",
             "run.peak_flops=1e12", "train.eval_batches=1")


def _cfg(run_dir: Path, *extra: str):
    return tiny_config(run_dir, *OVERRIDES, *extra)


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", "configs/tiny.yaml", *OVERRIDES,
                             f"run.dir={run_dir}", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.002) -> bool:
    """Polls until ``predicate()`` holds (True) or the process exits (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out")


def _metric_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_bytes().splitlines()) if path.is_file() else 0


def _committed(run_dir: Path) -> list[int]:
    """Committed checkpoints that carry a matching manifest. Orbax deletes a checkpoint past
    ``checkpoint.keep`` in place, file by file: a kill in the middle leaves an older step
    half-deleted, damaged and no longer committed (a resume never reaches back past a newer one)."""
    ckpt = run_dir / "checkpoints"
    steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.is_dir() else []
    return sorted(s for s in steps if _verifies(ckpt / str(s), run_dir))


def _verifies(step_dir: Path, run_dir: Path) -> bool:
    try:
        return checkpoint_module.verify(step_dir, run_dir)
    except DamagedCheckpointError:
        return False


def _resumed_from(stdout: str) -> int:
    line = next(x for x in stdout.splitlines() if "steps " in x and "->" in x)
    return int(line.split("steps ")[1].split("->")[0])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted run (checkpoints 20 and 24)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(_cfg(run_dir))
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[int, float]:
    """The losses of an uninterrupted run."""
    return losses_of(reference_run)


def test_sigterm_saves_exits_0_and_resume_continues_the_same_curve(eight_devices, reference,
                                                                   tmp_path, capsys):
    """Also the determinism check: the steps before the signal come from another process with
    the same seed, config and mesh, and must equal the reference bitwise."""
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    assert _wait_for(lambda: _metric_lines(run_dir) >= 6, proc, poll=0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = int(out.split("stopped by SIGTERM after step ")[1].split()[0])
    assert 6 <= stopped < STEPS and f"checkpoint {stopped} is committed" in out
    assert _committed(run_dir)[-1] == stopped

    train(_cfg(run_dir))
    assert _resumed_from(capsys.readouterr().out) == stopped
    losses = losses_of(run_dir)
    assert [losses[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]


def _step_dirs(ckpt: Path) -> tuple[list[int], list[int]]:
    """(committed, unfinished) steps in ``ckpt`` as it is now, by name only (safe while the run
    writes): orbax commits a save by renaming ``<step>.orbax-checkpoint-tmp*`` to ``<step>``."""
    names = os.listdir(ckpt) if ckpt.is_dir() else []
    return (sorted(int(n) for n in names if n.isdigit()),
            sorted(int(n.split(TMP_SUFFIX)[0]) for n in names if TMP_SUFFIX in n))


def _later_save_unfinished(ckpt: Path) -> bool:
    committed, unfinished = _step_dirs(ckpt)
    return bool(committed) and any(s > committed[-1] for s in unfinished)


def _place_kill(proc: subprocess.Popen, run_dir: Path, rng: random.Random, when: str) -> None:
    """Waits for the moment to SIGKILL the run: inside its nth asynchronous save (``save``, n
    random; ``first_save``, nothing committed yet), at a random moment of its start-up (``start``),
    or once a checkpoint has committed and training went on 0-13 steps more: at once (``train``) or
    inside the next save, a newer step still being written (``later_save``)."""
    ckpt = run_dir / "checkpoints"
    if when in ("save", "first_save"):
        nth = rng.randint(1, 5) if when == "save" else 1
        seen: set[int] = set()

        def in_save() -> bool:
            seen.update(_step_dirs(ckpt)[1])
            return len(seen) >= nth
        _wait_for(in_save, proc, poll=0.001)
        time.sleep(rng.uniform(0, 0.05))
    elif when == "start":
        time.sleep(rng.uniform(0, 8))  # config, tokenizer, compile: about 10 s here
    else:
        _wait_for(lambda: bool(_step_dirs(ckpt)[0]), proc, poll=0.002)
        target = min(_metric_lines(run_dir) + rng.randint(0, 13), STEPS - 3)
        _wait_for(lambda: _metric_lines(run_dir) >= target, proc, poll=0.002)
        if when == "later_save":
            _wait_for(lambda: _later_save_unfinished(ckpt), proc, poll=0.001)
            time.sleep(rng.uniform(0, 0.02))  # a save of this run is open for 50-300 ms
        else:
            time.sleep(rng.uniform(0, 0.1))


def _kill_trial(run_dir: Path, rng: random.Random, when: str, capsys) -> dict:
    """Starts a run, SIGKILLs it where ``_place_kill`` says, then resumes it in this process to
    the end. Returns what the kill left and where the resume started."""
    proc = _start(run_dir)
    _place_kill(proc, run_dir, rng, when)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill ({when})"
    ckpt = run_dir / "checkpoints"
    unfinished = _step_dirs(ckpt)[1]
    committed = _committed(run_dir)
    capsys.readouterr()
    train(_cfg(run_dir))
    resumed = _resumed_from(capsys.readouterr().out)
    assert not _step_dirs(ckpt)[1]  # unfinished saves cleaned up
    return {"when": when, "committed": committed, "unfinished_save": bool(unfinished),
            "later_save_unfinished": bool(committed) and any(s > committed[-1] for s in unfinished),
            "resumed": resumed}


def _check_trial(run_dir: Path, trial: dict, reference) -> None:
    committed = trial["committed"]
    assert trial["resumed"] == (committed[-1] if committed else 0), trial
    losses = losses_of(run_dir)
    assert [losses[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]


def test_sigkill_during_an_async_save_resumes_from_the_last_committed(eight_devices, reference,
                                                                     tmp_path, capsys):
    trial = _kill_trial(tmp_path / "run", random.Random(1), "save", capsys)
    _check_trial(tmp_path / "run", trial, reference)


# Eight of ten kills come after a checkpoint committed, so the restart really resumes (four of them
# inside a later save); two come before any commit, so the restart begins again from step 0.
KILL_PLAN = ("later_save", "train", "start", "later_save", "train", "later_save", "first_save",
             "train", "later_save", "train")


@pytest.mark.slow  # ~3 min: each trial starts a run (~15 s to its first commit) and resumes it
def test_sigkill_at_random_points_always_resumes_exactly(eight_devices, reference, tmp_path, capsys):
    rng = random.Random(7)
    trials = []
    for i, when in enumerate(KILL_PLAN):
        run_dir = tmp_path / f"trial{i}"
        trial = _kill_trial(run_dir, rng, when, capsys)
        _check_trial(run_dir, trial, reference)
        trials.append(trial)
    resumed = [t for t in trials if t["resumed"] > 0]
    later = [t for t in resumed if t["later_save_unfinished"]]
    with capsys.disabled():
        print(f"\n{len(trials)} kill trials survived, {len(resumed)} resumed from a committed "
              f"checkpoint, {len(later)} with a later save unfinished:")
        for t in trials:
            print(" ", t)
    assert len(resumed) >= 8 and len(later) >= 3, (len(resumed), len(later))


def _nan_weights(steps: set[int]):
    def hook(step: int, batch: dict) -> dict:
        if step in steps:
            batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
        return batch
    return hook


def _restored_states(run_dir: Path, cfg):
    """Every checkpoint of the run, restored on one device."""
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    _, abstract = abstract_state(cfg.model, tx)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint, read_only=True)
    try:
        return [checkpointer.restore(s, abstract, shardings)[0] for s in checkpointer.all_steps()]
    finally:
        checkpointer.close()


def test_nan_batches_are_skipped_counted_never_checkpointed_and_a_streak_stops_the_run(
        eight_devices, tmp_path, capsys):
    # Steps 4 and 5 are skipped and training goes on; from step 10 on every batch is NaN, and the
    # third in a row (step 12) ends the run.
    cfg = _cfg(tmp_path / "run", "train.steps=20", "checkpoint.keep=5", "train.max_skipped_steps=2")
    with pytest.raises(RunError, match=r"stopped at step 12: 3 steps in a row had a non-finite loss "
                                       r"or gradient norm \(train.max_skipped_steps=2\); the last "
                                       r"checkpoint is 8"):
        train(cfg, batch_hook=_nan_weights({4, 5, *range(10, 21)}))
    assert "warning: step 4: non-finite loss (nan)" in capsys.readouterr().err
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train_lines = {r["step"]: r for r in records if "loss" in r}
    assert [s for s, r in train_lines.items() if r["skipped"]][:2] == [4, 5]
    assert np.isnan(train_lines[4]["loss"]) and np.isfinite(train_lines[6]["loss"])
    assert train_lines[9]["skipped_steps"] == 2
    states = _restored_states(tmp_path / "run", cfg)
    assert [int(s.step) for s in states] == [4, 8]
    for state in states:
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_a_skipped_step_leaves_params_and_optimizer_state_unchanged():
    tx, schedule = make_optimizer(OptimConfig(), 10)
    graphdef, abstract = abstract_state(SMALL, tx)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = init_state(SMALL, tx, 0, jax.tree.map(lambda _: device, abstract))
    step = jax.jit(lambda s, b: train_step(s, b, graphdef=graphdef, tx=tx, schedule=schedule,
                                           microbatches=1))
    batch = {k: jnp.asarray(v) for k, v in random_batch(4, 8, SMALL.vocab_size).items()}
    state, _ = step(state, batch)  # one real step: Adam's moments and count are non-trivial
    bad = dict(batch, weights=batch["weights"].at[0, 0].set(jnp.inf))
    after, metrics = step(state, bad)
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == int(state.step) + 1
    for a, b in zip(jax.tree.leaves((after.params, after.opt_state)),
                    jax.tree.leaves((state.params, state.opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def saved_run(reference_run) -> tuple[Path, object]:
    """The reference run (checkpoints 20 and 24) and its config."""
    return reference_run, _cfg(reference_run)


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, tmp_path / "copy")
    return tmp_path / "copy"


def _largest_state_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_a_damaged_checkpoint_is_detected_moved_aside_and_the_previous_used(saved_run, tmp_path,
                                                                            capsys, damage):
    run_dir = _copy(saved_run[0], tmp_path)
    cfg = saved_run[1]
    target = _largest_state_file(run_dir / "checkpoints/24")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:100] + bytes([data[100] ^ 0x01]) + data[101:])
    elif damage == "delete":
        target.unlink()
    else:
        (run_dir / "checkpoints/24" / MANIFEST).write_text('{"files": ')
    with pytest.raises(DamagedCheckpointError, match="checkpoint 24 is damaged"):
        checkpoint_module.verify(run_dir / "checkpoints/24", run_dir)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    try:
        assert checkpointer.resume_step() == 20
        assert checkpointer.all_steps() == [20]
    finally:
        checkpointer.close()
    err = capsys.readouterr().err
    assert "warning: checkpoint 24 is damaged" in err and "resumes from checkpoint 20" in err
    assert (run_dir / DAMAGED_DIR / "24").is_dir()


def test_a_changed_tokenizer_file_stops_the_resume(saved_run, tmp_path):
    run_dir = _copy(saved_run[0], tmp_path)
    (run_dir / "tokenizer.json").write_text(json.dumps({"vocab_size": 259, "kind": "byte"}))  # valid, altered
    checkpointer = Checkpointer(run_dir, saved_run[1].checkpoint)
    try:
        with pytest.raises(DamagedRunFileError, match="tokenizer.json .* since checkpoint 24"):
            checkpointer.resume_step()
    finally:
        checkpointer.close()


def test_eval_refuses_a_damaged_checkpoint_with_one_line(eight_devices, saved_run, tmp_path, capsys):
    from cli.eval import main as eval_main

    run_dir = _copy(saved_run[0], tmp_path)
    target = _largest_state_file(run_dir / "checkpoints/24")
    target.write_bytes(target.read_bytes()[:-7])
    # Asked for by its step (a run directory falls back as training does: tests/test_run_safety.py)
    assert eval_main(["perplexity", "--checkpoint", str(run_dir / "checkpoints/24"),
                      "--max-batches", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: cannot restore checkpoint 24 of {run_dir}: checkpoint 24 is damaged: "
        f"state/{target.relative_to(run_dir / 'checkpoints/24/state')} has "
        f"{target.stat().st_size} bytes, {target.stat().st_size + 7} were written (truncated or altered)"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_tokenizer_file_is_a_clear_error(tmp_path, damage):
    from data.tokenizer import load_tokenizer, make_tokenizer, save_tokenizer

    save_tokenizer(make_tokenizer("byte"), tmp_path)
    path = tmp_path / "tokenizer.json"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else bytes([data[0] ^ 0xFF]) + data[1:])
    with pytest.raises(ValueError, match="is not a valid tokenizer file"):
        load_tokenizer(tmp_path)


def test_full_disk_at_save_ends_the_run_without_a_checkpoint(eight_devices, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "free_bytes", lambda path: 1024)
    with pytest.raises(RunError, match=r"checkpoint 4 could not be written: not enough disk space "
                                       r"for checkpoint 4 .* 0.0 MiB free"):
        train(_cfg(tmp_path / "run", "train.steps=8"))
    assert not any((tmp_path / "run/checkpoints").iterdir())


@pytest.mark.slow  # ~15 s end to end
def test_a_failed_async_write_ends_the_run_and_commits_nothing(eight_devices, tmp_path, monkeypatch):
    def no_space(step_dir, run_dir):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint_module, "write_manifest", no_space)
    with pytest.raises(RunError, match=r"^checkpoint 4 could not be written: .*No space left on device"):
        train(_cfg(tmp_path / "run", "train.steps=8"))
    assert _step_dirs(tmp_path / "run/checkpoints")[0] == []  # no step directory, damaged or not
    monkeypatch.undo()  # the disk has space again: the run starts over cleanly
    train(_cfg(tmp_path / "run", "train.steps=4"))
    assert _committed(tmp_path / "run") == [4]


def test_unwritable_run_dir_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match="run.dir: cannot write to"):
        train(_cfg(tmp_path / "file" / "run"))


def test_a_coordinator_that_never_answers_ends_with_one_line_in_bounded_time(tmp_path):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "train", "configs/tiny.yaml",
                             f"run.dir={tmp_path / 'run'}", "run.distributed=true",
                             "run.coordinator=127.0.0.1:9", "run.num_processes=2", "run.process_id=1",
                             "run.cpu_devices=4", "run.init_timeout=3"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and time.monotonic() - start < 60
    assert result.stderr.strip().splitlines()[-1] == (
        "error: could not join the coordinator at 127.0.0.1:9 within run.init_timeout=3 s (is "
        "process 0 running and reachable, and did every process start?)")


def test_the_automatic_step_limit_is_ten_median_steps_after_warm_up_and_at_least_the_floor():
    limit = StepLimit(0.0)
    for _ in range(WARMUP_STEPS):
        limit.observe(1000.0, 1)  # warm-up steps are not counted
    for seconds in [10.0, 12.0, 11.0, 30.0, 9.0][:MIN_SAMPLES - 1]:
        limit.observe(seconds, 1)
        assert limit.seconds() is None  # too few steps timed yet
    limit.observe(9.0, 1)
    assert limit.seconds() == 110.0  # 10 x the median of 10, 12, 11, 30, 9
    limit.observe(6.0, 3)  # three steps came back together: 2 s each
    assert limit.seconds() == 95.0  # median of 2, 2, 2, 9, 10, 11, 12, 30
    assert "10x the median step of 9.5 s, at least 60 s" in limit.describe()

    tiny = StepLimit(0.0)
    tiny.observe(0.01 * (WARMUP_STEPS + MIN_SAMPLES), WARMUP_STEPS + MIN_SAMPLES)
    assert tiny.seconds() == FLOOR_S  # millisecond steps: jitter must not trip it

    explicit, never = StepLimit(2.5), StepLimit(-1.0)
    assert explicit.seconds() == 2.5 and never.seconds() is None  # explicit: from the first step
    for _ in range(20):
        explicit.observe(100.0, 1)
        never.observe(100.0, 1)
    assert explicit.seconds() == 2.5 and never.seconds() is None
    assert explicit.describe() == "run.step_timeout=2.5"
