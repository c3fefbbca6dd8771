"""Input pipeline throughput against what the training step consumes, for the default config.

The pipeline (grain: read, tokenize, pack, batch, thread prefetch) must supply at least 10x the
tokens per second that the train step on the 8-device mesh consumes.
"""

from __future__ import annotations

import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from bench.common import print_table, write_result  # noqa: E402
from data.pipeline import train_dataset  # noqa: E402
from data.sources import open_source  # noqa: E402
from data.tokenizer import make_tokenizer  # noqa: E402
from sharding.constrain import activation_sharding  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from sharding.rules import default_rules  # noqa: E402
from train.config import load_config  # noqa: E402
from train.optimizer import make_optimizer  # noqa: E402
from train.state import abstract_state, init_state, state_shardings  # noqa: E402
from train.step import batch_sharding, jit_train_step  # noqa: E402


def pipeline_tokens_per_s(cfg, batches: int = 300) -> float:
    """Real (weighted) tokens per second delivered by the training pipeline."""
    d, t = cfg.data, cfg.train
    docs = open_source(d.source, "train", eval_fraction=d.eval_fraction)
    it = iter(train_dataset(docs, make_tokenizer(d.tokenizer), seq_len=t.seq_len,
                            batch_size=t.batch_size, seed=t.seed, streams=d.streams,
                            prefetch=d.prefetch, shuffle_tokens=d.shuffle_tokens))
    for _ in range(10):
        next(it)
    start, tokens = time.perf_counter(), 0.0
    for _ in range(batches):
        tokens += float(next(it)["weights"].sum())
    rate = tokens / (time.perf_counter() - start)
    it.close()
    return rate


def train_tokens_per_s(cfg, steps: int = 8) -> float:
    """Tokens per second the default train step consumes on the configured mesh."""
    t = cfg.train
    mesh, rules = make_mesh(cfg.mesh), default_rules()
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
    return t.batch_size * t.seq_len / float(np.median(times))


def main(argv: list[str]) -> int:
    cfg = load_config(None, argv)
    supply = pipeline_tokens_per_s(cfg)
    demand = train_tokens_per_s(cfg)
    ratio = supply / demand
    print_table("input pipeline vs training step (configs/default.yaml)", [
        ("pipeline tokens/s", f"{supply:,.0f}"),
        ("train step tokens/s", f"{demand:,.0f}"),
        ("supply / demand", f"{ratio:.1f}x (target >= 10x)"),
    ])
    path = write_result("pipeline", {"source": cfg.data.source, "tokenizer": cfg.data.tokenizer,
                                     "seq_len": cfg.train.seq_len,
                                     "batch_size": cfg.train.batch_size,
                                     "mesh": dict(vars(cfg.mesh))},
                        {"pipeline_tokens_per_s": supply, "train_tokens_per_s": demand,
                         "ratio": ratio, "meets_10x": ratio >= 10})
    print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
