"""Timing of one jitted train step of a config on a chosen set of devices: compile time, XLA's memory
analysis, the process's resident memory, and the median of N steps on a fixed random batch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sharding.constrain import activation_sharding
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules
from train.config import Config
from train.optimizer import make_optimizer
from train.state import abstract_state, init_state, state_shardings
from train.step import batch_sharding, jit_train_step


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


def memory_of(compiled: Any) -> dict[str, int]:
    """XLA's per-device memory analysis of a compiled program (bytes): arguments, outputs, donated
    (aliased) bytes, temporaries, and the total live at once."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    out = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
           "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes}
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
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
    mesh_cfg = cfg.mesh if devices is None else MeshConfig(data=len(devices))
    mesh, rules = make_mesh(mesh_cfg, devices), default_rules()
    tx, schedule = make_optimizer(cfg.optim, t.steps)
    with activation_sharding(mesh, rules):
        graphdef, abstract = abstract_state(cfg.model, tx)
        shardings = state_shardings(abstract, mesh, rules)
        state = init_state(cfg.model, tx, 0, shardings)
        batch_sh = batch_sharding(mesh, rules, t.batch_size, t.seq_len)
        step = jit_train_step(graphdef, tx, schedule, t.microbatches, shardings, batch_sh)
        batch = random_batch(t.batch_size, t.seq_len, min(256, cfg.model.vocab_size))
        batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        loss = float(jax.device_get(metrics["loss"]))
    return {"compile_s": compile_s, "step_s": float(np.median(times)), "step_times_s": times,
            "memory": memory_of(compiled), "final_loss": loss, **rss_bytes()}


def step_seconds(cfg: Config, steps: int = 10, devices: list | None = None) -> float:
    """Median wall time of the train step of ``cfg`` on ``devices`` (see ``measure_train_step``)."""
    return measure_train_step(cfg, steps, devices)["step_s"]
