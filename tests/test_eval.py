"""The eval CLI on a real (tiny) trained run: perplexity agrees with training's evaluation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_config
from train.loop import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    summary = train(tiny_config(run_dir, "train.steps=20", "mesh.data=2", "mesh.tensor=4",
                                "checkpoint.every=10"))
    return run_dir, summary


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_perplexity_matches_training_eval_on_another_mesh(eight_devices, trained_run):
    run_dir, summary = trained_run
    result = run_eval("perplexity", "--checkpoint", str(run_dir), "--max-batches", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["step"] == 20 and 0 < report["tokens"] <= 2 * 16 * 32
    assert abs(report["loss"] - summary["eval_loss"]) <= 1e-5 * summary["eval_loss"]


def test_generate_from_a_step_directory(eight_devices, trained_run):
    run_dir, _ = trained_run
    result = run_eval("generate", "--checkpoint", str(run_dir / "checkpoints" / "10"),
                      "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["prompt"] == "def " and out["tokens"] <= 8


@pytest.mark.parametrize("args, message", [
    (["perplexity", "--checkpoint", "/nonexistent/run"], "neither a meshlm run directory"),
    (["generate", "--checkpoint", "RUN/checkpoints/7", "--prompt", "x"], "does not exist"),
    (["generate", "--checkpoint", "RUN", "--prompt", ""], "empty prompt"),
    (["generate", "--checkpoint", "RUN", "--prompt", "x", "--temperature", "-1"], "--temperature"),
])
def test_eval_errors_exit_2(trained_run, args, message):
    run_dir, _ = trained_run
    result = run_eval(*[a.replace("RUN", str(run_dir)) for a in args])
    assert result.returncode == 2 and result.stderr.startswith("error:") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_damaged_input_position_stops_the_resume_with_one_line(trained_run, tmp_path):
    import shutil

    run_dir, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "20" / "data" / "process_0-of-1.json").write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "train", "configs/tiny.yaml", f"run.dir={copy}",
                             "train.steps=30", "mesh.data=2", "mesh.tensor=4",
                             "checkpoint.every=10"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: run.dir: cannot resume from checkpoint 20: checkpoint 20 has a damaged input "
        "position (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"]
