"""Perplexity of a loaded run over held-out text: one full pass with the sharded eval step."""

from __future__ import annotations

import math
from typing import Any

import jax

from data.batches import eval_batches, to_global
from data.corpus import load_tokens
from eval.load import LoadedRun
from sharding.constrain import activation_sharding
from train.step import batch_sharding, jit_eval_step


def perplexity(run: LoadedRun, source: str | None = None, batch_size: int = 0,
               max_batches: int = 0) -> dict[str, Any]:
    """Loss, perplexity, token count and bits per byte over the evaluation split of ``source``
    (default: the run's own data.source). Every held-out token counts exactly once."""
    cfg = run.cfg
    source = source or cfg.data.source
    seq_len = cfg.train.seq_len
    batch_size = batch_size or cfg.train.batch_size
    _, tokens = load_tokens(source, run.tokenizer, cfg.data.max_bytes, cfg.data.eval_fraction)
    batches = eval_batches(tokens, batch_size, seq_len, max_batches)
    with activation_sharding(run.mesh, run.rules):
        batch_sh = batch_sharding(run.mesh, run.rules, batch_size, seq_len)
        params_sh = jax.tree.map(lambda x: x.sharding, run.params)
        eval_step = jit_eval_step(run.graphdef, params_sh, batch_sh)
        loss_sum = weight_sum = 0.0
        byte_count = 0
        for local in batches:
            out = jax.device_get(eval_step(run.params, to_global(local, batch_sh, batch_size)))
            loss_sum += float(out["loss_sum"])
            weight_sum += float(out["weight_sum"])
            for row, weights in zip(local["targets"], local["weights"], strict=True):
                if weights.any():
                    byte_count += len(run.tokenizer.decode(row.tolist()).encode("utf-8"))
    loss = loss_sum / max(weight_sum, 1.0)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(weight_sum),
            "bits_per_byte": loss_sum / math.log(2) / max(byte_count, 1), "source": source,
            "step": run.step}
