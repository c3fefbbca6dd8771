"""Input pipeline throughput against what the training step consumes, for the default config.

The pipeline (grain: read, tokenize, pack, batch, thread prefetch) must supply at least 10x the
tokens per second that the train step on the 8-device mesh consumes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from bench.common import print_table, write_result
from bench.timing import step_seconds
from cli.args import Parser, run
from cli.config_args import add_config_arguments, config_arguments
from cli.host import quiet_tpu_probe, use_cpu_devices
from data.pipeline import train_dataset
from data.sources import open_source
from data.tokenizer import make_tokenizer
from train.config import load_config


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
    return cfg.train.batch_size * cfg.train.seq_len / step_seconds(cfg, steps)


def pipeline_command(argv: Sequence[str]) -> int:
    parser = Parser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    add_config_arguments(parser)
    cfg = load_config(*config_arguments(parser.parse_intermixed_args(argv)))
    quiet_tpu_probe()
    use_cpu_devices(8)
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


def main(argv: Sequence[str] | None = None) -> int:
    return run(pipeline_command, argv)


if __name__ == "__main__":
    sys.exit(main())
