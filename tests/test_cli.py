"""The training CLI: configuration mistakes exit 2 with one `error:` line naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from cli import train as train_cli

ROOT = Path(__file__).resolve().parent.parent


def run_train(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args, f"run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override, key", [
    ("mesh.data=3", "mesh"),  # 3 x 1 x 1 x 1 != 8 devices
    ("model.num_kv_heads=3", "model.num_kv_heads"),  # 4 heads not divisible by 3 kv heads
    ("mesh.tensor=8", "model.num_heads"),  # 4 heads not divisible by the tensor axis
    ("train.batch_size=12", "train.batch_size"),  # not divisible by data=8
    ("train.seq_len=128", "train.seq_len"),  # larger than max_seq_len=64
    ("model.hidden=7", "model.hidden"),  # unknown key
    ("train.steps=many", "train.steps"),  # wrong type
    ("model.position=alibi", "model.position"),  # not a choice
    ("nosuch.key=1", "nosuch.key"),  # unknown section
    ("run.step_timeout=-2", "run.step_timeout"),  # only -1 (never) may be negative
    ("train.profile=5:3", "train.profile"),  # START after END
    ("run.wandb=team/project", "run.wandb"),  # W&B refuses / in a project name
])
def test_config_errors_exit_2_with_one_line(eight_devices, tmp_path, capsys, override, key):
    code = train_cli.main([str(ROOT / "configs/tiny.yaml"), override, f"run.dir={tmp_path / 'run'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], lines
    assert not (tmp_path / "run").exists()  # rejected before anything was written


def test_missing_preset_is_an_error(tmp_path):  # through python -m train: one line, no traceback
    result = run_train("configs/nope.yaml", tmp_path=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: config")


def test_help_exits_0(tmp_path):
    result = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage" in result.stdout
