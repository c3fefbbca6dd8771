"""A run directory is never silently lost or shared: a checkpoint without a manifest is not trusted,
a run whose checkpoints all fail verification refuses to start again unless asked (and then keeps
its old metrics), metrics cut on resume are archived, a second trainer on the same directory is
refused while a killed one's lock does not block, and eval chooses its checkpoint as training does."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train.checkpoint as checkpoint_module
from core.errors import ConfigError
from tests.helpers import losses_of, tiny_config
from train.checkpoint import MANIFEST, Checkpointer, DamagedCheckpointError
from train.loop import train
from train.run_dir import DAMAGED_DIR, RunDir

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ("train.steps=8", "checkpoint.every=4", "checkpoint.keep=2", "train.log_every=1",
             "optim.decay_steps=8", "optim.warmup_steps=2", "run.tensorboard=false",
             "run.peak_flops=1e12", "train.eval_batches=1")


def _cfg(run_dir: Path, *extra: str):
    return tiny_config(run_dir, *OVERRIDES, *extra)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A finished run of 8 steps with checkpoints 4 and 8."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    train(_cfg(run_dir))
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def _truncate_largest_state_file(step_dir: Path) -> None:
    target = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    target.write_bytes(target.read_bytes()[:-7])


def _listing(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(run_dir).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ item 10: verification fails shut

def test_a_checkpoint_without_a_manifest_is_not_trusted(saved, tmp_path, capsys):
    run_dir = _copy(saved, tmp_path)
    (run_dir / "checkpoints/8" / MANIFEST).unlink()
    with pytest.raises(DamagedCheckpointError, match=f"checkpoint 8 is damaged: it has no {MANIFEST}"):
        checkpoint_module.verify(run_dir / "checkpoints/8", run_dir)
    checkpointer = Checkpointer(run_dir, _cfg(run_dir).checkpoint)
    try:
        assert checkpointer.resume_step() == 4
        assert checkpointer.all_steps() == [4]
    finally:
        checkpointer.close()
    assert "warning: checkpoint 8 is damaged" in capsys.readouterr().err
    assert (run_dir / DAMAGED_DIR / "8").is_dir()


def test_a_run_whose_checkpoints_all_fail_verification_refuses_to_start_again(saved, tmp_path):
    run_dir = _copy(saved, tmp_path)
    (run_dir / "checkpoints/8" / MANIFEST).unlink()
    _truncate_largest_state_file(run_dir / "checkpoints/4")
    before = _listing(run_dir)
    with pytest.raises(ConfigError) as refused:
        train(_cfg(run_dir))
    message = str(refused.value)
    assert message.startswith(f"run.dir: none of the 2 checkpoints of {run_dir} verifies "
                              f"(checkpoint 8 is damaged: it has no {MANIFEST})")
    assert "checkpoint.restart_if_damaged=true" in message and "\n" not in message
    # No checkpoint was moved, no metric cut, no tokenizer rewritten (the config is checked and
    # recorded first, as at every start).
    def kept(listing):
        return {k: v for k, v in listing.items() if k.startswith(("checkpoints/", "metrics", "token"))}
    assert kept(_listing(run_dir)) == kept(before) and "metrics.jsonl" in kept(before)
    assert not (run_dir / DAMAGED_DIR).exists()


def test_restart_if_damaged_starts_from_step_0_and_archives_the_old_metrics(saved, tmp_path, capsys):
    run_dir = _copy(saved, tmp_path)
    _truncate_largest_state_file(run_dir / "checkpoints/8")
    _truncate_largest_state_file(run_dir / "checkpoints/4")
    old_metrics = (run_dir / "metrics.jsonl").read_bytes()
    summary = train(_cfg(run_dir, "checkpoint.restart_if_damaged=true"))
    err = capsys.readouterr().err
    assert "warning: checkpoint 8 is damaged" in err and "training starts again from step 0" in err
    assert summary["step"] == 8
    assert sorted(p.name for p in (run_dir / DAMAGED_DIR).iterdir()) == ["4", "8"]
    assert (run_dir / "metrics.superseded.1.jsonl").read_bytes() == old_metrics
    assert losses_of(run_dir) == losses_of(saved)  # metrics.jsonl holds the new run only


def test_metrics_cut_on_resume_are_archived_not_deleted(tmp_path):
    run = RunDir(tmp_path)
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 7)]
    torn = '{"step": 7, "lo'
    run.metrics_file.write_text("\n".join(lines) + "\n" + torn)
    run.trim_metrics(4)
    assert run.metrics_file.read_text() == "".join(x + "\n" for x in lines[:4])
    assert (tmp_path / "metrics.superseded.1.jsonl").read_text() == "".join(
        x + "\n" for x in [*lines[4:], torn])
    run.metrics_file.write_text(run.metrics_file.read_text() + lines[4] + "\n")
    run.trim_metrics(4)  # a second cut gets a file of its own
    assert (tmp_path / "metrics.superseded.2.jsonl").read_text() == lines[4] + "\n"
    run.trim_metrics(4)  # nothing to cut: no new file
    assert not (tmp_path / "metrics.superseded.3.jsonl").exists()


# ------------------------------------------------------------------- item 12: one writer per run dir

def test_a_second_trainer_is_refused_and_a_killed_trainers_lock_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    # The module's config (its learning rate schedule ends at step 8, train.steps does not enter
    # the programs): both trainers run the programs of the ``saved`` run, which the compilation
    # cache holds, so neither compiles.
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([sys.executable, "-m", "train", "configs/tiny.yaml", *OVERRIDES,
                              f"run.dir={run_dir}", "train.steps=100000"],
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_bytes().splitlines()) >= 3):
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # holds its lock, writes nothing while we look
        before = _listing(run_dir)
        with pytest.raises(ConfigError) as refused:
            train(_cfg(run_dir, "train.steps=4"))
        assert str(refused.value) == (
            f"run.dir: {run_dir} is in use by another trainer (pid {first.pid} on "
            f"{socket.gethostname()}); wait for it to end or choose another run.dir")
        assert _listing(run_dir) == before
    finally:
        first.kill()
        first.wait()
        log.close()
    assert (run_dir / "run.lock").is_file()  # left behind by the killed trainer
    summary = train(_cfg(run_dir, "train.steps=4"))
    assert summary["step"] >= 4


# ----------------------------------------------------- item 13: eval picks its checkpoint as training

def test_eval_falls_back_like_training_and_refuses_an_explicit_damaged_step(
        eight_devices, saved, tmp_path, capsys):
    from cli.eval import main as eval_main

    run_dir = _copy(saved, tmp_path)
    _truncate_largest_state_file(run_dir / "checkpoints/8")
    capsys.readouterr()
    assert eval_main(["perplexity", "--checkpoint", str(run_dir), "--max-batches", "1"]) == 0
    out, err = capsys.readouterr()
    warnings = err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: checkpoint 8 is damaged: state/")
    assert warnings[0].endswith("; using checkpoint 4, the newest that verifies"), warnings[0]
    assert json.loads(out.strip().splitlines()[-1])["step"] == 4
    assert (run_dir / "checkpoints/8").is_dir()  # eval moves nothing: the run may be live

    assert eval_main(["perplexity", "--checkpoint", str(run_dir / "checkpoints/8"),
                      "--max-batches", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: cannot restore checkpoint 8 of {run_dir}: checkpoint 8 is damaged: state/")

    (run_dir / "checkpoints/4" / MANIFEST).unlink()  # no manifest: refused as well
    assert eval_main(["perplexity", "--checkpoint", str(run_dir / "checkpoints/4"),
                      "--max-batches", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: cannot restore checkpoint 4 of {run_dir}: checkpoint 4 is damaged: it has no "
        f"{MANIFEST}"]
