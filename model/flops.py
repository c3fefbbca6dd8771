"""Parameter, FLOP and KV-cache accounting for dense and MoE decoders, and MFU against a measured
matmul peak. Pure arithmetic on a ModelConfig; only the peak-FLOP/s helpers at the end run JAX.

Training FLOPs per token = 6 * N_matmul + 12 * L * T * N * H, where N_matmul counts every weight used
in a matmul by one token (attention, MLP or the router plus the k chosen and the shared experts, and
the LM head; not the embedding lookup) and the second term is the attention scores and weighted
values (QK^T and PV) over a context of T tokens, forward and backward (PaLM, appendix B). With MLA
(model/mla.py) a query/key head is P + R wide and a value head V, so 4 N H becomes 2 N (P + R + V),
and N_matmul counts its latent projections once per token (the expansion of each token's latent
into keys and values in training, or the weight absorption of a decode step, uses each once). The causal
mask is not subtracted (the einsum and xla kernels compute the full T x T scores; blockwise attention
skips key blocks wholly in the future, a few percent of these FLOPs). Capacity padding is not counted
unless asked for (``executed=True``: what the capacity path's expert matmuls really compute).
Inference (forward only) is a third of that: 2 * N_matmul + 4 * L * S * N * H for a token attending
to S keys. Elementwise work (norms, softmax, RoPE, the optimizer) is not counted; on the presets it
is a few per cent of what XLA's ``cost_analysis()`` reports for the compiled step.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from model.config import ModelConfig


def _layer_params(cfg: ModelConfig) -> dict[str, int]:
    """Weights of one block's parts: attention, norms, dense MLP, one expert, an MoE layer's router
    and shared experts."""
    d, h, n, k = cfg.d_model, cfg.resolved_head_dim, cfg.num_heads, cfg.num_kv_heads
    per_unit = (3 if cfg.gated_mlp else 2) * d  # one hidden unit of an MLP
    expert = per_unit * cfg.resolved_expert_mlp_dim
    # weights outside any matmul: the norms (post norms, per-head q/k norms), q/k/v biases
    norms = (4 if cfg.post_norms else 2) * d + (2 * h if cfg.qk_norm else 0) + \
        ((n + 2 * k) * h if cfg.qkv_bias else 0)
    attn = d * n * h + 2 * d * k * h + n * h * d
    if cfg.attention_type == "mla":
        attn, latent_norms = _mla_params(cfg)
        norms += latent_norms
    return {"attn": attn, "norms": norms,
            "mlp": per_unit * cfg.mlp_dim, "one_expert": expert, "router": d * cfg.num_experts,
            "shared": cfg.num_shared_experts * expert}


def _mla_params(cfg: ModelConfig) -> tuple[int, int]:
    """(matmul weights, latent norm scales) of one MLA layer: the query (full rank, or down,
    up), the latent's down projection and the shared rope key, the latent's key and value up
    projections, the output."""
    d, n, c, r = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    p, v, rq = cfg.qk_nope_head_dim, cfg.resolved_v_head_dim, cfg.q_lora_rank
    query = (d * rq + rq * n * (p + r)) if rq else d * n * (p + r)
    return query + d * (c + r) + c * n * (p + v) + n * v * d, c + rq


def pair_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of one query and one key in one layer: QK^T and PV, 2 N (H_qk + H_v)
    (4 N H with one head width; MLA's heads: P + R and V)."""
    if cfg.attention_type == "mla":
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        return 2 * cfg.num_heads * (qk + cfg.resolved_v_head_dim)
    return 4 * cfg.num_heads * cfg.resolved_head_dim


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """total, embedding (token + learned positions), non_embedding, and active (total less the
    experts a token does not use: every MoE layer runs k of its num_experts) parameter counts."""
    d, v, l = cfg.d_model, cfg.vocab_size, cfg.num_layers
    p = _layer_params(cfg)
    moe_layers = cfg.num_moe_layers
    moe_ffn = p["router"] + cfg.num_experts * p["one_expert"] + p["shared"]
    embedding = v * d + (cfg.max_seq_len * d if cfg.position == "learned" else 0)
    head = 0 if cfg.tie_embeddings else d * v
    non_embedding = (l * (p["attn"] + p["norms"]) + (l - moe_layers) * p["mlp"] + moe_layers * moe_ffn
                     + d + head)
    total = embedding + non_embedding
    inactive = moe_layers * (cfg.num_experts - cfg.experts_per_token) * p["one_expert"]
    return {"total": total, "embedding": embedding, "non_embedding": non_embedding,
            "active": total - inactive}


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: attention, MLP (or router, k experts and the
    shared ones) and the LM head."""
    p = _layer_params(cfg)
    moe_layers = cfg.num_moe_layers
    moe_ffn = p["router"] + cfg.experts_per_token * p["one_expert"] + p["shared"]
    return (cfg.num_layers * p["attn"] + (cfg.num_layers - moe_layers) * p["mlp"] + moe_layers * moe_ffn
            + cfg.d_model * cfg.vocab_size)


def expert_slots_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Expert MLP applications per token in one MoE layer as computed: k when dropless; with the
    capacity path every expert runs over all its ``expert_capacity(seq_len)`` slots of a row of
    ``seq_len`` tokens, used or padding, so E * C / T (about capacity_factor * k)."""
    if not cfg.is_moe:
        return 0.0
    if cfg.moe_impl == "dropless":
        return float(cfg.experts_per_token)
    return cfg.num_experts * cfg.expert_capacity(seq_len) / seq_len


def attention_flops_per_token(cfg: ModelConfig, context: int, backward: bool = True) -> float:
    """QK^T and PV FLOPs of one token attending to ``context`` keys in every layer (a local layer:
    at most ``sliding_window`` keys): 4 * S * N * H per layer forward (``pair_flops``), three
    times that with the backward pass. Linear in the context per token, so O(n^2) per sequence of
    n tokens (O(n * W) for local layers)."""
    keys = sum(min(context, cfg.sliding_window) if cfg.is_local_layer(d) else context
               for d in range(cfg.num_layers))
    forward = keys * pair_flops(cfg)
    return 3 * forward if backward else forward


def _executed_matmul_params(cfg: ModelConfig, seq_len: int, executed: bool) -> float:
    """matmul_params, plus (``executed``) the capacity path's padded expert slots."""
    matmul = float(matmul_params(cfg))
    if executed and cfg.is_moe:
        extra = expert_slots_per_token(cfg, seq_len) - cfg.experts_per_token
        matmul += cfg.num_moe_layers * extra * _layer_params(cfg)["one_expert"]
    return matmul


def causal_train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """``train_flops_per_token`` with each query's attention over the keys it may see in a causal
    row of ``seq_len`` tokens (on average (T + 1) / 2; a local layer's min(t + 1, W)) instead of all
    T: what a kernel that skips masked blocks (splash, blockwise) must compute, and the count
    MaxText's MFU uses. At long contexts the full-T count exceeds any causal kernel's work."""
    t = seq_len
    keys = 0.0
    for d in range(cfg.num_layers):
        w = cfg.sliding_window if cfg.is_local_layer(d) else 0
        if w and w < t:  # sum over t of min(t + 1, w), averaged
            keys += (w * (w + 1) / 2 + (t - w) * w) / t
        else:
            keys += (t + 1) / 2
    attention = 3 * keys * pair_flops(cfg)
    return 6 * _executed_matmul_params(cfg, seq_len, False) + attention


def train_flops_per_token(cfg: ModelConfig, seq_len: int, executed: bool = False) -> float:
    """Forward + backward FLOPs per trained token at context length ``seq_len``; ``executed``
    counts the capacity path's padded expert slots too (see ``expert_slots_per_token``)."""
    return 6 * _executed_matmul_params(cfg, seq_len, executed) + attention_flops_per_token(cfg, seq_len)


def frozen_train_flops_per_token(cfg: ModelConfig, seq_len: int, trainable_params: int) -> float:
    """Forward + backward FLOPs per token when the model's weights are frozen and only
    ``trainable_params`` extra (LoRA) weights train: the backward pass still computes every
    activation gradient (2N) but no weight gradient of a frozen matrix, so 4N + 6 N_trainable."""
    return (4 * _executed_matmul_params(cfg, seq_len, False) + 6 * trainable_params
            + attention_flops_per_token(cfg, seq_len))


def inference_flops_per_token(cfg: ModelConfig, context: int, executed: bool = False) -> float:
    """Forward FLOPs of one token attending to ``context`` keys: a decode step at a cache of that
    length, or (times n) a prefill of n = ``context`` tokens with the full n x n scores;
    ``executed`` as in ``train_flops_per_token`` (rows of ``context`` tokens)."""
    return (2 * _executed_matmul_params(cfg, context, executed)
            + attention_flops_per_token(cfg, context, backward=False))


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "float8": 1}


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str = "") -> int:
    """Bytes one cached token takes: keys and values of K heads of H in every layer (MLA: the
    latent C and the rope key R), in ``dtype`` (default: the compute dtype, which the decoder's
    cache uses)."""
    width = DTYPE_BYTES[dtype or cfg.dtype]
    if cfg.attention_type == "mla":
        return cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * width
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.resolved_head_dim * width


def mha_twin(cfg: ModelConfig) -> ModelConfig:
    """An MLA model's twin with the attention it replaces: K = N key/value heads of the query/key
    width P + R (what an uncompressed cache of its keys would hold per head); others unchanged."""
    return dataclasses.replace(cfg, attention_type="gqa", num_kv_heads=cfg.num_heads,
                               head_dim=cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)


def accounting(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Every figure above for one config at context ``seq_len``, as one flat dict."""
    counts = param_counts(cfg)
    train = train_flops_per_token(cfg, seq_len)
    attention = attention_flops_per_token(cfg, seq_len)
    return {**{f"params_{k}": v for k, v in counts.items()},
            "matmul_params": matmul_params(cfg), "seq_len": seq_len,
            "train_flops_per_token": train, "train_attention_flops_per_token": attention,
            "train_attention_share": attention / train,
            "train_flops_per_token_executed": train_flops_per_token(cfg, seq_len, executed=True),
            "inference_flops_per_token": inference_flops_per_token(cfg, seq_len),
            "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg),
            **({"kv_cache_bytes_per_token_gqa": kv_cache_bytes_per_token(mha_twin(cfg))}
               if cfg.attention_type == "mla" else {})}


def context_table(cfg: ModelConfig, lengths: list[int], batch: int = 1,
                  kv_dtype: str = "") -> list[dict]:
    """Per context length n: attention FLOPs per token and per sequence, their share of training and
    of inference FLOPs, and the KV cache of ``batch`` sequences of n tokens."""
    per_token = kv_cache_bytes_per_token(cfg, kv_dtype)
    rows = []
    for n in lengths:
        train = train_flops_per_token(cfg, n)
        attention = attention_flops_per_token(cfg, n)
        infer = inference_flops_per_token(cfg, n)
        rows.append({"length": n, "train_flops_per_token": train,
                     "train_attention_flops_per_token": attention,
                     "train_attention_share": attention / train, "train_flops_per_sequence": train * n,
                     "train_attention_flops_per_sequence": attention * n,
                     "decode_flops_per_token": infer,
                     "decode_attention_share": attention_flops_per_token(cfg, n, backward=False) / infer,
                     "kv_cache_bytes": per_token * n * batch})
    return rows


def measure_matmul_peak(size: int = 1024, repeats: int = 10, dtype: str = "float32") -> float:
    """FLOP/s of the best of ``repeats`` [size x size] ``dtype`` matmuls (float32 accumulation) on
    the first local device: the practical compute limit of a CPU host (all its emulated devices
    share those cores)."""
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


# Published dense bf16 peak FLOP/s per chip, by a substring of ``device.device_kind``.
TPU_PEAK_FLOPS = {"v4": 275e12, "v5 lite": 197e12, "v5e": 197e12, "v5p": 459e12, "v5": 459e12,
                  "v6 lite": 918e12, "v6e": 918e12}


def peak_flops(configured: float) -> tuple[float, str]:
    """(peak FLOP/s of the whole job, where the figure came from); 0 when unknown."""
    if configured > 0:
        return configured, "configured (run.peak_flops)"
    if jax.default_backend() == "cpu":
        return measure_matmul_peak(), "float32 matmul measured on this host"
    kind = jax.devices()[0].device_kind.lower()
    for name, per_chip in TPU_PEAK_FLOPS.items():
        if name in kind:
            return per_chip * jax.device_count(), f"published bf16 peak of {kind}"
    return 0.0, f"unknown for {kind}: set run.peak_flops"
