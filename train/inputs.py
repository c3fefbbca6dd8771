"""This process's share of a run's data: the endless training batches (a grain iterator whose
position checkpoints save) and the evaluation batches, as many on every process."""

from __future__ import annotations

from typing import Any

import jax

from core.errors import ConfigError
from data.batches import equalize_across_processes
from data.documents import open_documents
from data.pipeline import Documents, Shard, empty_batch, eval_batches, regroup_state, train_dataset
from data.preference import (
    PREFIX,
    open_pairs,
    pair_batches,
    pair_eval_batches,
    regroup_pair_state,
)
from data.sources import Split
from data.tokenizer import Tokenizer
from sharding.mesh import sync_processes
from train.config import Config, DataConfig
from train.run_dir import RunDir


def this_shard() -> Shard:
    return Shard(jax.process_index(), jax.process_count())


def open_inputs(cfg: Config, run: RunDir) -> tuple[Tokenizer, Any, list]:
    """(the run's tokenizer, training batch iterator, evaluation batches) of this process's rows;
    ConfigError for a tokenizer or data the user pointed at that cannot be read (unreadable files,
    empty globs, unknown datasets)."""
    d, t = cfg.data, cfg.train
    shard = this_shard()
    local_batch = t.batch_size // shard.count
    try:
        tokenizer = run.tokenizer_for(d.tokenizer)
        if d.source.startswith(PREFIX):  # preference pairs: read and validated here, nothing cached
            iterator, batches = open_pairs_inputs(cfg, tokenizer, shard)
        else:
            iterator, batches = open_documents_inputs(cfg, tokenizer, shard)
    except ValueError as e:
        raise ConfigError("data", str(e)) from None
    return tokenizer, iterator, equalize_across_processes(batches, empty_batch(local_batch, t.seq_len))


def open_documents_inputs(cfg: Config, tokenizer: Tokenizer, shard: Shard) -> tuple[Any, list]:
    """(training iterator, evaluation batches) of a document source or mixture."""
    d, t = cfg.data, cfg.train
    local_batch = t.batch_size // shard.count
    if shard.index == 0:  # process 0 prepares sources and token caches once; the others reuse them
        train_docs, eval_docs = (open_split(d, split, tokenizer, t.seq_len) for split in ("train", "eval"))
    sync_processes("meshlm: data sources prepared")
    if shard.index != 0:
        train_docs, eval_docs = (open_split(d, split, tokenizer, t.seq_len) for split in ("train", "eval"))
    iterator = iter(train_dataset(train_docs, tokenizer, seq_len=t.seq_len, batch_size=local_batch,
                                  seed=t.seed, shard=shard, streams=d.streams, prefetch=d.prefetch,
                                  shuffle_tokens=d.shuffle_tokens))
    return iterator, eval_batches(eval_docs, tokenizer, seq_len=t.seq_len, batch_size=local_batch,
                                  max_batches=t.eval_batches, shard=shard)


def open_pairs_inputs(cfg: Config, tokenizer: Tokenizer, shard: Shard) -> tuple[Any, list]:
    """(training iterator, evaluation batches) of a ``pref:`` source's pairs (every record is read
    and validated here; ValueError naming the file and line)."""
    d, t = cfg.data, cfg.train
    local_batch = t.batch_size // shard.count
    train_rows, eval_rows = (open_pairs(d.source, split, tokenizer, t.seq_len, d.eval_fraction)
                             for split in ("train", "eval"))
    iterator = iter(pair_batches(train_rows, batch_size=local_batch, seed=t.seed, shard=shard,
                                 prefetch=d.prefetch))
    return iterator, pair_eval_batches(eval_rows, batch_size=local_batch,
                                       max_batches=t.eval_batches, shard=shard)


def open_split(d: DataConfig, split: Split, tokenizer: Tokenizer, seq_len: int = 0) -> Documents:
    """The documents of ``split`` that ``d`` names: its source or mixture, through the token cache when
    ``data.token_cache`` is set (``seq_len``: the rows conversations must fit, `open_documents`).
    ValueError (one line) for data that cannot be read."""
    return open_documents(d.source, d.mix, split, tokenizer, token_cache=d.token_cache,
                          eval_fraction=d.eval_fraction, data_dir=d.data_dir or None,
                          cache_dir=d.cache_dir or None, seq_len=seq_len)


def resume_position(iterator: Any, saved: list[dict[str, Any]], d: DataConfig) -> None:
    """Sets the training iterator to the positions every process saved (also when the number of
    processes changed, except for preference pairs)."""
    if d.source.startswith(PREFIX):
        iterator.set_state(regroup_pair_state(saved, this_shard()))
    else:
        iterator.set_state(regroup_state(saved, this_shard(), d.streams))
