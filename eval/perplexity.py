"""Perplexity of a loaded run over held-out text: one full pass over packed rows of the model's own
window (``model.max_seq_len`` unless a shorter one is asked for; rows no longer than the text needs)
through the inference graph, the model as served, as scoring and the harness run it (an MoE model
drops no token). Training's ``eval_loss`` runs the training graph over ``train.seq_len`` rows: for a
capacity-path MoE model that drops tokens, or with another window, the two differ."""

from __future__ import annotations

import glob
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from data.batches import equalize_across_processes
from data.documents import open_documents
from data.pipeline import Shard, empty_batch, eval_batches
from data.tokenizer import check_utf8
from inference.generate import bucket
from inference.load import LoadedRun
from inference.score import BatchLoss


def perplexity_window(max_seq_len: int, window: int = 0) -> int:
    """``window`` (0: the model's own, ``max_seq_len``); ValueError outside 2..max_seq_len."""
    window = window or max_seq_len
    if not 2 <= window <= max_seq_len:
        raise ValueError(f"--window {window} is outside 2..{max_seq_len} (model.max_seq_len)")
    return window


def default_batch_size(run: LoadedRun, window: int) -> int:
    """Rows per batch holding as many tokens as a training batch (at least one row per process)."""
    t, processes = run.cfg.train, jax.process_count()
    rows = max(t.batch_size * t.seq_len // window, 1)
    return max(rows // processes, 1) * processes


def trimmed(batches: list[dict[str, np.ndarray]], window: int) -> list[dict[str, np.ndarray]]:
    """``batches`` without the padding columns that no row of any process reaches: rows as long as
    the longest real one, rounded up to a power of two (a short text does not pay for a long
    window). Padding comes after a row's tokens, so no score changes."""
    used = max((int(np.flatnonzero(b["weights"].any(axis=0)).max(initial=-1)) + 1 for b in batches),
               default=0)
    if jax.process_count() > 1:
        used = int(multihost_utils.process_allgather(np.int32(used)).max())
    length = bucket(used, window)
    return [{k: v[:, :length] for k, v in b.items()} for b in batches]


def perplexity(run: LoadedRun, source: str | None = None, batch_size: int = 0,
               max_batches: int = 0, *, text_file: str | None = None,
               window: int = 0) -> dict[str, Any]:
    """Loss, perplexity, token count and bits per byte over the evaluation split of ``source``
    (default: the run's own data.source, or data.mix), or over all of ``text_file``, in rows of
    ``window`` tokens (0: ``model.max_seq_len``). Every token counts once."""
    d = run.cfg.data
    own_mix = d.mix if source is None and text_file is None else ""
    if text_file is not None:
        path = Path(text_file).resolve()
        check_utf8(path)
        source, split, eval_fraction = f"text:{glob.escape(str(path))}", "train", 0.0
    else:
        source, split, eval_fraction = source or d.source, "eval", d.eval_fraction
    window = perplexity_window(run.window, window)
    batch_size = batch_size or default_batch_size(run, window)
    if batch_size % jax.process_count():
        raise ValueError(f"--batch-size {batch_size} is not divisible by the process count")
    shard = Shard(jax.process_index(), jax.process_count())
    local_batch = batch_size // shard.count
    docs = open_documents(source, own_mix, split, run.tokenizer, eval_fraction=eval_fraction,
                          data_dir=d.data_dir or None, cache_dir=d.cache_dir or None)
    batches = eval_batches(docs, run.tokenizer, seq_len=window, batch_size=local_batch,
                           max_batches=max_batches, shard=shard)
    batches = trimmed(equalize_across_processes(batches, empty_batch(local_batch, window)), window)
    length = batches[0]["inputs"].shape[1] if batches else window
    step = BatchLoss(run.cfg.model, run.params, run.mesh, run.rules, batch_size, length)
    loss_sum = weight_sum = 0.0
    byte_count = 0
    for local in batches:
        losses, weights = step(local)
        loss_sum += losses
        weight_sum += weights
        for row, row_weights in zip(local["targets"], local["weights"], strict=True):
            real = row[row_weights > 0].tolist()
            # the bytes the targets stand for (special tokens none: an "hf" decode spells them)
            byte_count += sum(len(run.tokenizer.token_bytes(t)) for t in real)
    if jax.process_count() > 1:  # every process counted the bytes of its own rows
        byte_count = int(multihost_utils.process_allgather(byte_count).sum())
    if weight_sum == 0:
        raise ValueError(f"{text_file or f'the evaluation split of {source}'} holds no tokens")
    loss = loss_sum / max(weight_sum, 1.0)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(weight_sum),
            "bits_per_byte": loss_sum / math.log(2) / max(byte_count, 1), "source": source,
            "window": window, "step": run.step}
