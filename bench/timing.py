"""Timing of one jitted train step of a config on a chosen set of devices: compile time, XLA's memory
analysis, the process's resident memory, and the median of N steps on a fixed random batch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sharding.mesh import MeshConfig, make_mesh
from train.config import Config
from train.program import Program, memory_report


def rss_bytes() -> dict[str, int]:
    """This process's resident memory now (``rss``) and at its peak so far (``rss_peak``)."""
    out = {"rss": 0, "rss_peak": 0}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                out["rss_peak"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def random_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A [B, T] next-token batch of uniform random tokens below ``vocab``, all weights 1."""
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch_size, seq_len + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": np.ones((batch_size, seq_len), np.float32)}


def measure_train_step(cfg: Config, steps: int = 10, devices: list | None = None) -> dict[str, Any]:
    """Compiles and runs the train step of ``cfg`` on ``devices`` (default: the config's mesh over
    all devices; a list runs pure data parallelism over those devices, one device unpartitioned).

    Returns ``compile_s`` (lowering + XLA compile), ``step_s`` (median of ``steps`` timed steps
    after one warm-up step), ``step_times_s``, ``memory`` (XLA's per-device analysis), and the
    process's ``rss``/``rss_peak`` bytes after the steps."""
    t = cfg.train
    mesh = make_mesh(cfg.mesh if devices is None else MeshConfig(data=len(devices)), devices)
    program = Program(cfg, mesh=mesh)
    state = program.init()
    batch = random_batch(t.batch_size, t.seq_len, min(256, cfg.model.vocab_size))
    batch = {k: jax.device_put(v, program.batch_sharding) for k, v in batch.items()}
    start = time.perf_counter()
    compiled = program.lower_train_step(batch).compile()
    compile_s = time.perf_counter() - start
    frozen = program.trainee.frozen
    state, metrics = compiled(state, batch, frozen)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, frozen)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    loss = float(jax.device_get(metrics["loss"]))
    return {"compile_s": compile_s, "step_s": float(np.median(times)), "step_times_s": times,
            "memory": memory_report(compiled), "final_loss": loss, **rss_bytes()}


def step_seconds(cfg: Config, steps: int = 10, devices: list | None = None) -> float:
    """Median wall time of the train step of ``cfg`` on ``devices`` (see ``measure_train_step``)."""
    return measure_train_step(cfg, steps, devices)["step_s"]
