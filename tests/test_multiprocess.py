"""Multi-process training on one machine: 2 processes x 4 CPU devices (jax.distributed, gloo)
train the same losses as 1 process x 8 devices, and their checkpoint resumes in one process; a
SIGTERM to one process stops both at the same step with a checkpoint; a process that dies makes the
other exit with one line in bounded time."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import losses_of
from train.checkpoint import verify

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5


def _run(*args: str, module: str = "train") -> None:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.slow  # ~65 s: two processes, then a resume in one
def test_two_processes_train_like_one_and_resume_in_one(tmp_path):
    common = ["configs/tiny.yaml", "train.log_every=1", "checkpoint.every=10", "run.progress=false",
              "train.steps=20", "optim.decay_steps=30"]
    _run("--processes", "2", *common, f"run.dir={tmp_path / 'two'}", module="train.launch")
    _run(*common, f"run.dir={tmp_path / 'one'}")
    two, one = losses_of(tmp_path / "two"), losses_of(tmp_path / "one")
    assert sorted(two) == sorted(one) == list(range(1, 21))
    assert all(abs(two[s] - one[s]) <= TOL * one[s] for s in one)
    assert sorted(p.name for p in (tmp_path / "two/checkpoints/20/data").glob("*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]

    # Both continue to step 30 in a single process: the 2-process checkpoint is regrouped.
    resume = ["configs/tiny.yaml", "train.log_every=1", "checkpoint.every=10",
              "run.progress=false", "train.steps=30", "optim.decay_steps=30"]
    _run(*resume, f"run.dir={tmp_path / 'two'}")
    _run(*resume, f"run.dir={tmp_path / 'one'}")
    two, one = losses_of(tmp_path / "two"), losses_of(tmp_path / "one")
    assert all(abs(two[s] - one[s]) <= TOL * one[s] for s in range(21, 31))


def test_launcher_rejects_an_uneven_split(tmp_path):
    result = subprocess.run([sys.executable, "-m", "train.launch", "--processes", "3",
                             "configs/tiny.yaml", f"run.dir={tmp_path}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: --processes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair(run_dir: Path, *extra: str, entry: tuple[tuple[str, ...], ...] = (("-m", "train"),) * 2,
                own: tuple[tuple[str, ...], ...] = ((), ())) -> list[subprocess.Popen]:
    """Two processes of one job, started directly (as on two hosts), output in files; process i
    runs python ``entry[i]`` and adds its ``own[i]`` overrides."""
    coordinator = f"127.0.0.1:{_free_port()}"
    run_dir.mkdir(parents=True)
    procs = []
    for i in range(2):
        log = (run_dir.parent / f"process_{i}.log").open("w")
        procs.append(subprocess.Popen(
            [sys.executable, *entry[i], "configs/tiny.yaml", f"run.dir={run_dir}",
             "run.distributed=true", f"run.coordinator={coordinator}", "run.num_processes=2",
             f"run.process_id={i}", "run.cpu_devices=4", "train.log_every=1",
             "run.tensorboard=false", "run.peak_flops=1e12", *extra, *own[i]],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True))
    return procs


def _wait_for_steps(run_dir: Path, procs: list[subprocess.Popen], steps: int) -> None:
    deadline = time.monotonic() + 300
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_bytes().splitlines()) >= steps):
        assert all(p.poll() is None for p in procs), "a process ended early"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _committed(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and verify(p, run_dir))


@pytest.mark.parametrize("dead", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_dead_peer_makes_the_other_exit_with_one_line_within_120_s(tmp_path, dead):
    run_dir = tmp_path / "run"
    # The kill falls between saves (checkpoint 10 committed, the next at 20): a peer that dies while
    # the survivor waits at a checkpoint's commit barrier is found by JAX's heartbeat instead, which
    # aborts the survivor itself (README).
    procs = _start_pair(run_dir, "train.steps=5000", "checkpoint.every=10")
    survivor = 1 - dead
    try:
        _wait_for_steps(run_dir, procs, 12)
        deadline = time.monotonic() + 60
        while not _committed(run_dir):
            assert time.monotonic() < deadline, "checkpoint 10 never committed"
            time.sleep(0.05)
        procs[dead].kill()
        killed = time.monotonic()
        code = procs[survivor].wait(timeout=180)
        elapsed = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    log = (tmp_path / f"process_{survivor}.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == 1 and elapsed < 120, (code, elapsed, log[-3000:])
    assert len(errors) == 1 and "lost contact with another process" in errors[0], log[-3000:]
    assert "Traceback" not in log
    print(f"process {survivor} exited {elapsed:.1f} s after process {dead} was killed: {errors[0]}",
          file=sys.stderr)
    assert _committed(run_dir)  # what was committed before still verifies


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    run_dir = tmp_path / "run"
    procs = _start_pair(run_dir, "train.steps=5000", "checkpoint.every=1000")
    try:
        _wait_for_steps(run_dir, procs, 8)
        procs[1].send_signal(signal.SIGTERM)  # a preemption notice reaching one host only
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    log = (tmp_path / "process_0.log").read_text()
    assert codes == [0, 0], log[-3000:]
    stopped = int(log.split("stopped by SIGTERM after step ")[1].split()[0])
    assert _committed(run_dir) == [stopped]
    assert sorted(p.name for p in (run_dir / f"checkpoints/{stopped}/data").glob("*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
def test_sigterm_to_the_launcher_reaches_every_process(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "train.launch", "--processes", "2",
                             "configs/tiny.yaml", f"run.dir={run_dir}", "train.steps=5000",
                             "checkpoint.every=1000", "train.log_every=1", "run.tensorboard=false",
                             "run.peak_flops=1e12"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(run_dir, [proc], 8)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    stopped = int(out.split("stopped by SIGTERM after step ")[1].split()[0])
    assert _committed(run_dir) == [stopped]


# python -m train whose batch hook never returns at step 9: a host that stops dispatching (stuck
# input, a hung driver call) while its peer goes on into step 9's collectives.
STALLED_AT_9 = ("-c", "import functools, sys, time\n"
                "import cli.train, train.loop\n"
                "def stall(step, batch):\n"
                "    if step == 9:\n"
                "        time.sleep(600)\n"
                "    return batch\n"
                "cli.train.train = functools.partial(train.loop.train, batch_hook=stall)\n"
                "sys.exit(cli.train.main(sys.argv[1:]))\n")


def test_a_hung_process_ends_every_process_with_one_line_naming_the_step(tmp_path):
    run_dir = tmp_path / "run"
    # Process 1 waits in step 9's collectives and its watchdog (2 s) ends it first; process 0, the
    # stalled one, is ended by its own (4 s). (Equal limits would race: the first to go makes the
    # other's collective fail, which it reports as a lost peer instead.)
    procs = _start_pair(run_dir, "train.steps=5000", "checkpoint.every=4",
                        entry=(STALLED_AT_9, ("-m", "train")),
                        own=(("run.step_timeout=4",), ("run.step_timeout=2",)))
    try:
        codes = [p.wait(timeout=90) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, limit in enumerate((4, 2)):
        log = (tmp_path / f"process_{i}.log").read_text()
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert codes[i] == 1 and len(errors) == 1, (codes, log[-3000:])
        assert errors[0].startswith(f"error: process {i} of 2: step 9 did not finish within {limit} s "
                                    f"(run.step_timeout={limit}; -1 = never)"), errors
        assert "Traceback" not in log
    assert _committed(run_dir) == [4, 8]  # the checkpoints before the hang are intact
