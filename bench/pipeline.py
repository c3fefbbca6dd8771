"""Input pipeline throughput against what the training step consumes, for the default config.

The pipeline (grain: read, tokenize, pack, batch, thread prefetch) must supply at least 10x the
tokens per second that the train step on the 8-device mesh consumes. Measured for the config's
source (text), the same documents as a parquet file (pyarrow), that parquet read through a token cache
(ArrayRecord ids: no tokenizing), and a two-source mixture (text and parquet, half each).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import print_table, write_result
from bench.timing import step_seconds
from cli.args import Parser, run
from cli.config_args import add_config_arguments, config_arguments
from cli.host import quiet_tpu_probe, use_cpu_devices
from data.documents import open_documents
from data.mixture import Mixture
from data.pipeline import Documents, train_dataset
from data.sources import open_source
from data.tokenizer import Tokenizer, make_tokenizer
from train.config import load_config

PARQUET_ROW_GROUP = 256  # documents per row group of the benchmark's parquet copy (several groups)


def pipeline_tokens_per_s(cfg, docs: Documents, tokenizer: Tokenizer, batches: int = 300) -> float:
    """Real (weighted) tokens per second delivered by the training pipeline reading ``docs``."""
    d, t = cfg.data, cfg.train
    it = iter(train_dataset(docs, tokenizer, seq_len=t.seq_len, batch_size=t.batch_size, seed=t.seed,
                            streams=d.streams, prefetch=d.prefetch, shuffle_tokens=d.shuffle_tokens))
    for _ in range(10):
        next(it)
    start, tokens = time.perf_counter(), 0.0
    for _ in range(batches):
        tokens += float(next(it)["weights"].sum())
    rate = tokens / (time.perf_counter() - start)
    it.close()
    return rate


def sources_to_measure(cfg, tokenizer: Tokenizer, folder: str) -> dict[str, Documents]:
    """The config's training documents, their parquet copy in ``folder`` (read as it is, and through
    a token cache written there), and a mixture of the two."""
    text = open_source(cfg.data.source, "train", eval_fraction=cfg.data.eval_fraction)
    pq.write_table(pa.table({"text": [text[i] for i in range(len(text))]}), f"{folder}/corpus.parquet",
                   row_group_size=PARQUET_ROW_GROUP)
    spec = f"parquet:{folder}/corpus.parquet"
    parquet = open_documents(spec, "", "train", tokenizer, eval_fraction=0.0)  # the same documents
    cached = open_documents(spec, "", "train", tokenizer, token_cache=True, eval_fraction=0.0,
                            cache_dir=folder)
    return {"text": text, "parquet": parquet, "parquet, token cache": cached,
            "mixture text+parquet": Mixture((text, parquet), (0.5, 0.5))}


def train_tokens_per_s(cfg, steps: int = 8) -> float:
    """Tokens per second the default train step consumes on the configured mesh."""
    return cfg.train.batch_size * cfg.train.seq_len / step_seconds(cfg, steps)


def pipeline_command(argv: Sequence[str]) -> int:
    parser = Parser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    add_config_arguments(parser)
    cfg = load_config(*config_arguments(parser.parse_intermixed_args(argv)))
    quiet_tpu_probe()
    use_cpu_devices(8)
    tokenizer = make_tokenizer(cfg.data.tokenizer)
    with tempfile.TemporaryDirectory() as folder:
        supply = {name: pipeline_tokens_per_s(cfg, docs, tokenizer)
                  for name, docs in sources_to_measure(cfg, tokenizer, folder).items()}
    demand = train_tokens_per_s(cfg)
    rows = [("train step tokens/s", f"{demand:,.0f}")]
    for name, rate in supply.items():
        rows.append((f"{name}: tokens/s", f"{rate:,.0f} = {rate / demand:.1f}x (target >= 10x)"))
    print_table("input pipeline vs training step (configs/default.yaml)", rows)
    ratio = supply["text"] / demand
    path = write_result("pipeline", {"source": cfg.data.source, "tokenizer": cfg.data.tokenizer,
                                     "seq_len": cfg.train.seq_len,
                                     "batch_size": cfg.train.batch_size,
                                     "parquet_row_group": PARQUET_ROW_GROUP,
                                     "mesh": dict(vars(cfg.mesh))},
                        {"pipeline_tokens_per_s": supply["text"], "train_tokens_per_s": demand,
                         "ratio": ratio, "meets_10x": ratio >= 10,
                         "sources": {name: {"tokens_per_s": rate, "ratio": rate / demand,
                                            "meets_10x": rate / demand >= 10}
                                     for name, rate in supply.items()}})
    print(f"  wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(pipeline_command, argv)


if __name__ == "__main__":
    sys.exit(main())
