"""Slow, obviously-correct NumPy oracles for the model's kernels. Written for clarity, not speed."""

import numpy as np


def attention(q_btnh, k_bskh, v_bskh, segment_ids_bt=None, window=0, scale=None, softcap=0.0):
    """Causal grouped-query attention, one (batch, head, query) at a time.

    Query head n uses key/value head n // (N / K) (each kv head serves a consecutive group). With a
    ``window`` (0 = none) query t sees only keys s > t - window. Scores are q.k * ``scale`` (default
    1 / sqrt(H)), then with a ``softcap`` softcap * tanh(score / softcap)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q_btnh, k_bskh, v_bskh))
    b_size, t_size, n_heads, h = q.shape
    kv_heads = k.shape[2]
    group = n_heads // kv_heads
    out = np.zeros(q.shape[:3] + v.shape[3:])  # value heads may be narrower or wider (MLA)
    for b in range(b_size):
        for n in range(n_heads):
            kv = n // group
            for t in range(t_size):
                visible = [s for s in range(max(0, t - window + 1) if window else 0, t + 1)
                           if segment_ids_bt is None or segment_ids_bt[b][s] == segment_ids_bt[b][t]]
                scores = np.array([q[b, t, n] @ k[b, s, kv] for s in visible])
                scores = scores * (1 / np.sqrt(h) if scale is None else scale)
                if softcap:
                    scores = softcap * np.tanh(scores / softcap)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[b, t, n] = sum(w * v[b, s, kv] for w, s in zip(weights, visible, strict=True))
    return out


def attention_weights(q_btnh, k_bskh):
    """[B, N, T, T] weights of causal grouped-query attention, one (batch, head, query) at a time:
    softmax over the visible keys s <= t of q.k / sqrt(H), zero on future positions."""
    q, k = np.asarray(q_btnh, np.float64), np.asarray(k_bskh, np.float64)
    b_size, t_size, n_heads, h = q.shape
    group = n_heads // k.shape[2]
    out = np.zeros((b_size, n_heads, t_size, t_size))
    for b in range(b_size):
        for n in range(n_heads):
            for t in range(t_size):
                scores = np.array([q[b, t, n] @ k[b, s, n // group] / np.sqrt(h) for s in range(t + 1)])
                weights = np.exp(scores - scores.max())
                out[b, n, t, :t + 1] = weights / weights.sum()
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


def log_softmax(logits):
    """log softmax over the last axis, in NumPy (nothing to compile)."""
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def relative_error(actual, expected) -> float:
    """max |a - e| / max |e|: one number for comparing whole tensors."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))



def moe_routing(x_btd, w_router_de, *, k, capacity=None, mask_bt=None):
    """Which experts each token goes to and which of those assignments are processed, one token at a
    time: (chosen, kept), chosen[b][t] = the token's k best experts by router logit x @ w_router,
    best first (ties: lower index); kept[b][t][i] = whether choice i fits. With a ``capacity`` each
    expert takes a row's assignments in token order until it holds ``capacity``; later ones are
    dropped. Tokens with mask False are not routed (chosen [], kept all False)."""
    x, w = np.asarray(x_btd, np.float64), np.asarray(w_router_de, np.float64)
    num_experts = w.shape[1]
    chosen, kept = [], []
    for b in range(x.shape[0]):
        taken = [0] * num_experts
        chosen_row, kept_row = [], []
        for t in range(x.shape[1]):
            if mask_bt is not None and not mask_bt[b][t]:
                chosen_row.append([])
                kept_row.append([False] * k)
                continue
            logits = x[b, t] @ w
            best = sorted(range(num_experts), key=lambda e, logits=logits: -logits[e])[:k]
            fits = []
            for e in best:
                fits.append(capacity is None or taken[e] < capacity)
                taken[e] += fits[-1]
            chosen_row.append(best)
            kept_row.append(fits)
        chosen.append(chosen_row)
        kept.append(kept_row)
    return chosen, kept


def moe(x_btd, w_router_de, w_up_edf, w_down_efd, w_gate_edf=None, *, mode, chosen, kept,
        scale=1.0):
    """Mixture of experts one token at a time, for the routing of ``moe_routing``: each token's
    output is the sum over its kept choices of gate * expert(x) (0 for an unrouted token).

    Gates from the router logits: ``softmax_topk`` = softmax over all experts, the chosen ones
    renormalised; ``topk_softmax`` = softmax over the chosen logits; ``softmax_topk_unnormalized`` =
    the chosen probabilities; ``sigmoid_topk`` = the chosen sigmoid(logits) renormalised,
    ``sigmoid_topk_unnormalized`` = as they are; all times ``scale``. Expert e: SwiGLU
    (silu(x Wg) * x Wu) Wd, or without ``w_gate_edf`` GELU (tanh form) gelu(x Wu) Wd. Written with
    jax.numpy so that jax.grad differentiates it (under jax.enable_x64 with float64 inputs it is a
    float64 oracle)."""
    import jax.numpy as jnp

    def expert(x_d, e):
        up_f = x_d @ w_up_edf[e]
        if w_gate_edf is None:
            h_f = 0.5 * up_f * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (up_f + 0.044715 * up_f ** 3)))
        else:
            gate_f = x_d @ w_gate_edf[e]
            h_f = gate_f / (1 + jnp.exp(-gate_f)) * up_f
        return h_f @ w_down_efd[e]

    rows = []
    for b in range(x_btd.shape[0]):
        outs = []
        for t in range(x_btd.shape[1]):
            x_d = x_btd[b, t]
            out_d = jnp.zeros_like(x_d)
            best = chosen[b][t]
            if best:
                logits_e = x_d @ w_router_de
                if mode == "topk_softmax":
                    top = jnp.stack([logits_e[e] for e in best])
                    gates = jnp.exp(top - jnp.max(top)) / jnp.sum(jnp.exp(top - jnp.max(top)))
                elif mode.startswith("sigmoid"):
                    gates = jnp.stack([1 / (1 + jnp.exp(-logits_e[e])) for e in best])
                    if mode == "sigmoid_topk":
                        gates = gates / jnp.sum(gates)
                else:
                    probs_e = jnp.exp(logits_e - jnp.max(logits_e))
                    probs_e = probs_e / jnp.sum(probs_e)
                    gates = jnp.stack([probs_e[e] for e in best])
                    if mode == "softmax_topk":
                        gates = gates / jnp.sum(gates)
                for i, e in enumerate(best):
                    if kept[b][t][i]:
                        out_d = out_d + scale * gates[i] * expert(x_d, e)
            outs.append(out_d)
        rows.append(jnp.stack(outs))
    return jnp.stack(rows)
