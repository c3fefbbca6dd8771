"""The LM head and the next-token cross-entropy, each defined once and used by training, evaluation,
scoring and perplexity.

``lm_logits`` applies the head weight [V, D] to final features (both in the compute dtype),
accumulating in float32 and giving float32 logits, soft-capped when the model asks for it
(``final_logit_softcap``, Gemma 2: cap * tanh(logits / cap)); ``token_nll`` is ``logsumexp(logits) -
logits[target]`` per position. ``nll_sums`` is what training and evaluation take from a batch:
with ``ModelConfig.loss_chunk > 0`` the head runs over chunks of positions, so the [B, T, V]
logits never exist at once: each chunk's [B, c, V] logits are made, reduced to their token losses
and made again in the backward pass (``jax.checkpoint``); the result is the same. ``head_nll_rows``
and ``sequence_nll`` keep one sum per row (a response's log-probability, for preference losses).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from model.lora import set_dropout_rows
from model.primitives import dense
from sharding.constrain import constrain


def lm_logits(x_btd: jax.Array, w_vd: jax.Array, softcap: float = 0.0) -> jax.Array:
    """Logits [B, T, V] of final features ``x_btd`` under the head weight ``w_vd``, accumulated in
    and returned as float32 whatever the compute dtype (bf16 logits would be quantised to steps of
    about 0.06 at magnitude 10, which cross-entropy and sampling would see); ``softcap`` > 0 (a
    model's ``final_logit_softcap``): cap * tanh(logits / cap)."""
    logits_btv = dense(x_btd, w_vd.T, out_dtype=jnp.float32)
    if softcap:
        logits_btv = softcap * jnp.tanh(logits_btv / softcap)
    return constrain(logits_btv, ("batch", "length", "vocab"))


def token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """The cross-entropy of each target token, -log softmax(logits)[target], [B, T] in float32."""
    logits_btv = logits_btv.astype(jnp.float32)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_btv, axis=-1) - target_logit_bt


def _chunk_rows(x_bcd: jax.Array, w_vd: jax.Array, targets_bc: jax.Array,
                weights_bc: jax.Array, *, softcap: float) -> jax.Array:
    """Weighted sum of one chunk's token losses, per row [B]."""
    return jnp.sum(token_nll(lm_logits(x_bcd, w_vd, softcap), targets_bc) * weights_bc, axis=-1)


def chunked_nll_rows(features_btd: jax.Array, w_vd: jax.Array, targets_bt: jax.Array,
                     weights_bt: jax.Array, chunk: int, softcap: float = 0.0) -> jax.Array:
    """Per row [B], the sum over positions of ``weights_bt * token_nll(lm_logits(features, w_vd,
    softcap), targets)``, computed over ``chunk`` positions at a time (T is padded with weight-0
    positions to a multiple of it)."""
    b, t, _ = features_btd.shape
    chunks = -(-t // chunk)
    pad = chunks * chunk - t
    if pad:
        features_btd = jnp.pad(features_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
        weights_bt = jnp.pad(weights_bt, ((0, 0), (0, pad)))

    def by_chunk(a: jax.Array) -> jax.Array:  # [B, n*c, ...] -> [n, B, c, ...]
        return a.reshape((b, chunks, chunk) + a.shape[2:]).swapaxes(0, 1)

    chunk_rows = jax.checkpoint(functools.partial(_chunk_rows, softcap=softcap))

    def body(total_b: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        x_bcd, targets_bc, weights_bc = xs
        return total_b + chunk_rows(x_bcd, w_vd, targets_bc, weights_bc), None

    total_b, _ = jax.lax.scan(body, jnp.zeros((b,), jnp.float32),
                              (by_chunk(features_btd), by_chunk(targets_bt), by_chunk(weights_bt)))
    return total_b


def chunked_nll_sum(features_btd: jax.Array, w_vd: jax.Array, targets_bt: jax.Array,
                    weights_bt: jax.Array, chunk: int, softcap: float = 0.0) -> jax.Array:
    """The sum over rows of ``chunked_nll_rows``."""
    return jnp.sum(chunked_nll_rows(features_btd, w_vd, targets_bt, weights_bt, chunk, softcap))


def head_nll_rows(x_btd: jax.Array, w_vd: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array,
                  chunk: int = 0, softcap: float = 0.0) -> jax.Array:
    """Per row [B], the sum over positions of ``weights_bt * token_nll(lm_logits(x_btd, w_vd,
    softcap), targets)`` (a sequence's negative log-likelihood); ``chunk`` as ``head_nll_sum``."""
    if chunk:
        return chunked_nll_rows(x_btd, w_vd, targets_bt, weights_bt, chunk, softcap)
    return jnp.sum(token_nll(lm_logits(x_btd, w_vd, softcap), targets_bt) * weights_bt, axis=-1)


def head_nll_sum(x_btd: jax.Array, w_vd: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array,
                 chunk: int = 0, softcap: float = 0.0) -> jax.Array:
    """Sum over positions of ``weights_bt * token_nll(lm_logits(x_btd, w_vd, softcap), targets)``;
    with ``chunk`` > 0 (``loss_chunk``) the head runs chunk by chunk: no [B, T, V] logits."""
    if chunk:
        return chunked_nll_sum(x_btd, w_vd, targets_bt, weights_bt, chunk, softcap)
    return jnp.sum(token_nll(lm_logits(x_btd, w_vd, softcap), targets_bt) * weights_bt)


def final_features(model: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict, jax.Array]:
    """(final features [B, T, D], the model's auxiliaries, float32 weights [B, T]) of a
    ``Transformer`` on a batch, as `nll_sums` describes it (``rows`` keys the LoRA dropout masks;
    weight-0 tokens are not routed to experts)."""
    weights_bt = batch["weights"].astype(jnp.float32)
    if "rows" in batch:
        set_dropout_rows(model, batch["rows"])
    x_btd, aux = model.hidden(batch["inputs"], batch.get("positions"), batch.get("segment_ids"),
                              routing_mask_bt=weights_bt > 0)
    return x_btd, aux, weights_bt


def sequence_nll(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """Each row's weighted token-loss sum [B] (minus a response's log-probability when the weights
    mark its tokens) of a ``Transformer`` on a batch, as ``nll_sums`` reads it. Auxiliary losses
    (MoE balancing, multi-token prediction) are not part of it."""
    x_btd, _, weights_bt = final_features(model, batch)
    cfg = model.cfg
    return head_nll_rows(x_btd, model.head_weight_vd(), batch["targets"], weights_bt,
                         cfg.loss_chunk, cfg.final_logit_softcap)


def nll_sums(model: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, dict]:
    """(sum of weighted token losses, sum of weights, auxiliaries) of a ``Transformer`` on a batch
    (``inputs``, ``targets``, ``weights`` [B, T], optional ``positions`` and ``segment_ids``,
    optional ``rows`` [B]: each row's index in the training step's whole batch, which keys its LoRA
    dropout masks); tokens of weight 0 (padding) are not routed to experts. The auxiliaries: an MoE
    model's (``Transformer.hidden``) and, with ``mtp_depth``, multi-token prediction's
    (``Transformer.mtp_losses``); their ``loss`` is what to add per token to the training
    objective (empty for a dense model without MTP)."""
    x_btd, aux, weights_bt = final_features(model, batch)
    cfg = model.cfg
    loss_sum = head_nll_sum(x_btd, model.head_weight_vd(), batch["targets"], weights_bt,
                            cfg.loss_chunk, cfg.final_logit_softcap)
    if cfg.mtp_depth:
        mtp = model.mtp_losses(x_btd, batch)
        aux = {**aux, **mtp, "loss": aux.get("loss", 0.0) + mtp["loss"]}
    return loss_sum, jnp.sum(weights_bt), aux
