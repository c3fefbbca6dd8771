"""Timing of one jitted train step of a config on a chosen set of devices (median of N steps)."""

from __future__ import annotations

import time

import jax
import numpy as np

from sharding.constrain import activation_sharding
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules
from train.config import Config
from train.optimizer import make_optimizer
from train.state import abstract_state, init_state, state_shardings
from train.step import batch_sharding, jit_train_step


def step_seconds(cfg: Config, steps: int = 10, devices: list | None = None) -> float:
    """Median wall time of the train step of ``cfg`` on ``devices`` (default: the config's mesh
    over all devices; a single device runs the same program unpartitioned)."""
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
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 256, (t.batch_size, t.seq_len + 1)).astype(np.int32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                 "weights": np.ones((t.batch_size, t.seq_len), np.float32)}
        batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    return float(np.median(times))
