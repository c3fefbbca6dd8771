"""Slow, obviously-correct NumPy oracles for the model's kernels. Written for clarity, not speed."""

import numpy as np


def attention(q_btnh, k_bskh, v_bskh, segment_ids_bt=None):
    """Causal grouped-query attention, one (batch, head, query) at a time.

    Query head n uses key/value head n // (N / K) (each kv head serves a consecutive group)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q_btnh, k_bskh, v_bskh))
    b_size, t_size, n_heads, h = q.shape
    kv_heads = k.shape[2]
    group = n_heads // kv_heads
    out = np.zeros_like(q)
    for b in range(b_size):
        for n in range(n_heads):
            kv = n // group
            for t in range(t_size):
                visible = [s for s in range(t + 1)
                           if segment_ids_bt is None or segment_ids_bt[b][s] == segment_ids_bt[b][t]]
                scores = np.array([q[b, t, n] @ k[b, s, kv] / np.sqrt(h) for s in visible])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[b, t, n] = sum(w * v[b, s, kv] for w, s in zip(weights, visible, strict=True))
    return out


def rope(x_btnh, positions_bt, theta):
    """Rotary embedding: for i < H/2 rotate the pair (x[i], x[i + H/2]) by pos * theta^(-2i/H)."""
    x = np.asarray(x_btnh, np.float64)
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            pos = positions_bt[b][t]
            for i in range(half):
                angle = pos * theta ** (-2.0 * i / x.shape[-1])
                c, s = np.cos(angle), np.sin(angle)
                a, bb = x[b, t, :, i], x[b, t, :, i + half]
                out[b, t, :, i] = a * c - bb * s
                out[b, t, :, i + half] = bb * c + a * s
    return out


def rms_norm(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def relative_error(actual, expected) -> float:
    """max |a - e| / max |e|: one number for comparing whole tensors."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))
