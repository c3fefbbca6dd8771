"""Perplexity of a loaded run over held-out text: one full pass with the training program's sharded
eval step."""

from __future__ import annotations

import dataclasses
import glob
import math
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from data.batches import equalize_across_processes
from data.pipeline import Shard, empty_batch, eval_batches
from data.sources import open_source
from data.tokenizer import check_utf8
from inference.load import LoadedRun
from train.config import FinetuneConfig
from train.program import Program


def perplexity(run: LoadedRun, source: str | None = None, batch_size: int = 0,
               max_batches: int = 0, *, text_file: str | None = None) -> dict[str, Any]:
    """Loss, perplexity, token count and bits per byte over the evaluation split of ``source``
    (default: the run's own data.source), or over all of ``text_file``. Every token counts once."""
    d = run.cfg.data
    if text_file is not None:
        path = Path(text_file).resolve()
        check_utf8(path)
        source, split, eval_fraction = f"text:{glob.escape(str(path))}", "train", 0.0
    else:
        source, split, eval_fraction = source or d.source, "eval", d.eval_fraction
    seq_len = run.cfg.train.seq_len
    batch_size = batch_size or run.cfg.train.batch_size
    if batch_size % jax.process_count():
        raise ValueError(f"--batch-size {batch_size} is not divisible by the process count")
    shard = Shard(jax.process_index(), jax.process_count())
    local_batch = batch_size // shard.count
    docs = open_source(source, split, eval_fraction=eval_fraction, data_dir=d.data_dir or None,
                       cache_dir=d.cache_dir or None)
    batches = eval_batches(docs, run.tokenizer, seq_len=seq_len, batch_size=local_batch,
                           max_batches=max_batches, shard=shard)
    batches = equalize_across_processes(batches, empty_batch(local_batch, seq_len))
    program = eval_program(run, batch_size)
    loss_sum = weight_sum = 0.0
    byte_count = 0
    for local in batches:
        out = jax.device_get(program.eval_step(run.params, program.global_batch(local)))
        loss_sum += float(out["loss_sum"])
        weight_sum += float(out["weight_sum"])
        for row, weights in zip(local["targets"], local["weights"], strict=True):
            real = row[weights > 0].tolist()
            # the bytes the targets stand for (special tokens none: an "hf" decode spells them)
            byte_count += sum(len(run.tokenizer.token_bytes(t)) for t in real)
    if jax.process_count() > 1:  # every process counted the bytes of its own rows
        byte_count = int(multihost_utils.process_allgather(byte_count).sum())
    if weight_sum == 0:
        raise ValueError(f"{text_file or f'the evaluation split of {source}'} holds no tokens")
    loss = loss_sum / max(weight_sum, 1.0)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(weight_sum),
            "bits_per_byte": loss_sum / math.log(2) / max(byte_count, 1), "source": source,
            "step": run.step}


def eval_program(run: LoadedRun, batch_size: int) -> Program:
    """The training program of the run's plain model on the mesh its parameters were loaded onto,
    with batches of ``batch_size`` rows (its eval step takes ``run.params`` as they are)."""
    cfg = run.cfg
    cfg = dataclasses.replace(cfg, finetune=FinetuneConfig(),
                              train=dataclasses.replace(cfg.train, batch_size=batch_size))
    return Program(cfg, mesh=run.mesh)
