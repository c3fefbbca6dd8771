"""Multi-process training on one machine: 2 processes x 4 CPU devices (jax.distributed, gloo)
train the same losses as 1 process x 8 devices, and their checkpoint resumes in one process."""

import subprocess
import sys
from pathlib import Path

from train.loop import losses_of

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5


def _run(*args: str, module: str = "train") -> None:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


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
