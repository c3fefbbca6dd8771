"""Shared benchmark plumbing: the machine description, the git commit, and JSON result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import jax

from model.flops import measure_matmul_peak

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": jax.device_count()}


def write_result(name: str, config: dict[str, Any], figures: dict[str, Any],
                 directory: Path | None = None) -> Path:
    """Writes NAME.json into ``directory`` (default bench/results/) and returns its path."""
    directory = directory or RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    record = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "git_commit": git_commit(), "machine": machine(), "config": config,
              "figures": figures}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def matmul_peak(dtype: str = "float32", sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> float:
    """FLOP/s of the best square ``dtype`` matmul (float32 accumulation) over ``sizes`` on the first
    device: the practical compute limit of this host for that dtype, measured now. (On CPUs with
    AVX512-BF16, bfloat16 matmuls run about twice as fast as float32 ones, so a bfloat16 model's
    MFU is taken against the bfloat16 peak.)"""
    return max(measure_matmul_peak(size, repeats, dtype) for size in sizes)
