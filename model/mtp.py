"""DeepSeek-V3's multi-token prediction (MTP, arXiv 2412.19437 section 2.2): ``mtp_depth`` modules
that predict one token further ahead each, in sequence, sharing the model's embedding and LM head.
Training only: generation, evaluation and the main loss never run them.

Module k (1..D) at position i combines the previous depth's representation h_i^{k-1} with the
embedding of token t_{i+k}: h'_i = W_proj [enorm(Emb(t_{i+k})); hnorm(h_i^{k-1})], runs one
Transformer block over the h' of the sequence (the same positions and packed documents as the main
model) to get h_i^k, whose logits, ``lm_logits(final_norm(h_i^k))`` under the shared head, predict
t_{i+k+1}. h^0 is the main model's final-norm features (what its head sees, and what vLLM and
SGLang feed DeepSeek-V3's MTP layer); the embedding comes first in the concatenation, as in
DeepSeek-V3's released ``eh_proj`` (the paper writes the hidden state first). The block is an MoE
block when the model is MoE (DeepSeek-V3's MTP layer 61 is), with its router metrics kept apart.

Names against DeepSeek-V3's checkpoint layer ``model.layers.{num_layers + k - 1}``: ``enorm``,
``hnorm``, ``w_proj_2dd`` = ``eh_proj.weight`` transposed, ``final_norm`` = ``shared_head.norm``,
``block`` = the decoder layer's own weights; its ``embed_tokens`` and ``shared_head.head`` are
copies of the shared embedding and head.

Targets from a batch of (inputs, targets) pairs (``inputs[i]`` = t_i, ``targets[i]`` = t_{i+1}):
depth k reads t_{i+k} = ``inputs[i+k]`` and predicts t_{i+k+1} = ``targets[i+k]`` with the weight
``weights[i+k]``, where i+k lies in the row and in i's document (``segment_ids``), else 0: no
prediction crosses a packed document's boundary or reaches into padding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import Span
from model.config import ModelConfig
from model.layers import RMSNorm
from model.primitives import dense, param
from sharding.constrain import constrain


def shift_left(x_bt: jax.Array, k: int) -> jax.Array:
    """``x`` moved k positions earlier along the length ([:, i] = x[:, i + k]), zeros after the end."""
    if k == 0:
        return x_bt
    shifted_bt = jnp.concatenate([x_bt[:, k:], jnp.zeros_like(x_bt[:, :k])], axis=1)
    return constrain(shifted_bt, ("batch", "length") + (None,) * (x_bt.ndim - 2))


def depth_batch(batch: dict[str, jax.Array], k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens_bt, targets_bt, weights_bt) of depth k: the token each position embeds (t_{i+k}),
    the one it predicts (t_{i+k+1}) and that prediction's weight (0 where t_{i+k+1} lies past the
    row, in another packed document, or in padding)."""
    weights_bt = shift_left(batch["weights"].astype(jnp.float32), k)
    segment_ids_bt = batch.get("segment_ids")
    if segment_ids_bt is not None:
        weights_bt = weights_bt * (shift_left(segment_ids_bt, k) == segment_ids_bt)
    return shift_left(batch["inputs"], k), shift_left(batch["targets"], k), weights_bt


class MTPModule(nnx.Module):
    """One prediction depth: (h^{k-1} [B, T, D], Emb(t_{i+k}) [B, T, D]) -> (h^k, the features its
    logits are taken from, the block's MoE metrics or {})."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, block: nnx.Module):
        d = cfg.d_model
        self.enorm = RMSNorm(d, cfg, rngs)
        self.hnorm = RMSNorm(d, cfg, rngs)
        self.w_proj_2dd = param(rngs, nnx.initializers.normal(cfg.init_std), (2 * d, d),
                                (None, "embed"), cfg.param_dtype)
        self.block = block
        self.final_norm = RMSNorm(d, cfg, rngs)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, h_btd: jax.Array, e_btd: jax.Array, span: Span,
                 routing_mask_bt: jax.Array | None) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
        x_bt2d = jnp.concatenate([self.enorm(e_btd), self.hnorm(h_btd)], axis=-1)
        x_btd = constrain(dense(x_bt2d, self.w_proj_2dd[...].astype(self.dtype)),
                          ("batch", "length", "embed"))
        h_btd, _, metrics = self.block(x_btd, span, routing_mask_bt)
        return h_btd, self.final_norm(h_btd), metrics
