"""A checkpoint's insides made visible (``python -m eval inspect``, ``cli/inspect.py``): token pieces
and byte spans, next-token probabilities under temperature, embedding neighbours and analogies, and
the attention weights and MoE routing of the real forward pass (the model's layers sow them as
intermediates). Each report is a JSON-able dict, shown as a table by ``format_table`` or drawn by
``eval/inspect_plots.py``.

Prompts start with BOS, as in training, and keep their last ``model.max_seq_len`` tokens (the model's
own window, never ``train.seq_len``). An MoE model runs with enough expert capacity that no token is
dropped, as in generation and scoring.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from core.errors import UsageError
from inference.generate import inference_graphdef
from inference.load import LoadedRun
from model.attention import Attention
from model.config import ModelConfig
from model.mla import MLAttention
from model.moe import MoE
from model.transformer import sown_arrays
from sharding.constrain import under_activation_sharding
from sharding.rules import Rules

COMMANDS = ("tokens", "next", "embeddings", "attention", "routing")


# ------------------------------------------------------------------------------------ token pieces


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """The bytes ``token`` stands for in the text (tokenizers without ``token_bytes``: its decoding)."""
    if hasattr(tokenizer, "token_bytes"):
        return tokenizer.token_bytes(token)
    return tokenizer.decode([token]).encode("utf-8") if 0 <= token < tokenizer.vocab_size else b""


def piece(tokenizer: Any, token: int) -> str:
    """A printable name for ``token``: its text (incomplete UTF-8 as \\xNN, control characters
    escaped), or <bos>, <eos>, <pad>, <unk>, <unused N> (ids past the tokenizer's vocabulary)."""
    specials = {tokenizer.bos_id: "<bos>", tokenizer.eos_id: "<eos>", tokenizer.pad_id: "<pad>"}
    if token in specials and token >= 0:
        return specials[token]
    if not 0 <= token < tokenizer.vocab_size:
        return f"<unused {token}>"
    raw = token_bytes(tokenizer, token)
    if not raw:
        return "<unk>" if token == 0 and tokenizer.kind == "sentencepiece" else f"<control {token}>"
    text = raw.decode("utf-8", errors="backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def token_spans(tokenizer: Any, text: str) -> list[dict[str, Any]]:
    """Each token of ``text``: id, piece and its byte span [start, end) in ``text.encode()``. Spans
    are None when the pieces' bytes do not spell the text (a normalising tokenizer)."""
    ids = tokenizer.encode(text)
    raws = [token_bytes(tokenizer, i) for i in ids]
    exact = b"".join(raws) == text.encode("utf-8")
    out, start = [], 0
    for token, raw in zip(ids, raws, strict=True):
        span = (start, start + len(raw)) if exact else (None, None)
        out.append({"id": int(token), "piece": piece(tokenizer, token), "start": span[0], "end": span[1]})
        start += len(raw)
    return out


def prompt_ids(tokenizer: Any, prompt: str, window: int) -> list[int]:
    """BOS (when the tokenizer has one) + the prompt's ids, as in training; the last ``window`` kept."""
    if not prompt:
        raise UsageError("empty prompt: give at least one character")
    ids = ([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + tokenizer.encode(prompt)
    if len(ids) > window:
        print(f"warning: prompt has {len(ids)} tokens, more than the model's window of {window}: "
              f"keeping its last {window}", file=sys.stderr)
    return ids[-window:]


# ---------------------------------------------------------------------------- probabilities, vectors


def temperature_probs(logits_v: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) in float64; T = 0 puts all the mass on the argmax (greedy decoding)."""
    logits_v = np.asarray(logits_v, np.float64)
    if temperature == 0:
        p_v = np.zeros_like(logits_v)  # one-hot: [V], never an identity matrix [V, V]
        p_v[int(np.argmax(logits_v))] = 1.0
        return p_v
    z = logits_v / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def entropy_bits(p_v: np.ndarray) -> float:
    p_v = p_v[p_v > 0]
    return max(0.0, float(-(p_v * np.log2(p_v)).sum()))


def cosine_neighbors(table_vd: np.ndarray, vector_d: np.ndarray, top: int,
                     exclude: set[int] = frozenset()) -> list[tuple[int, float]]:
    """The ``top`` rows of ``table_vd`` most cosine-similar to ``vector_d`` (ids in ``exclude``
    skipped), best first, as (id, cosine)."""
    table = np.asarray(table_vd, np.float64)
    norms = np.linalg.norm(table, axis=1) * max(np.linalg.norm(vector_d), 1e-30)
    cos_v = table @ np.asarray(vector_d, np.float64) / np.maximum(norms, 1e-30)
    cos_v[list(exclude)] = -np.inf
    order = np.argsort(-cos_v, kind="stable")[:top]
    return [(int(i), float(cos_v[i])) for i in order if np.isfinite(cos_v[i])]


def word_form(tokenizer: Any, word: str) -> str:
    """The spelling of ``word`` to look up: with a leading space when that makes it one token and
    the bare word is not one already (or is, but as a word-piece: byte-level BPE vocabularies hold
    "king" for "viking" and " king" for the word in running text)."""
    if not word or word[0].isspace():
        return word
    spaced = tokenizer.encode(" " + word)
    if len(spaced) == 1 and (len(tokenizer.encode(word)) > 1 or tokenizer.kind == "hf"):
        return " " + word
    return word


def word_vector(tokenizer: Any, table_vd: np.ndarray, word: str) -> tuple[np.ndarray, list[int]]:
    """(vector, ids): a word's token vector, or the mean of its tokens' vectors when it spans several."""
    if not word:
        raise UsageError("empty word")
    ids = tokenizer.encode(word_form(tokenizer, word))
    unk = 0 if tokenizer.kind == "sentencepiece" else -1
    if not ids or unk in ids or max(ids) >= table_vd.shape[0]:
        raise UsageError(f"{word!r} is not in the vocabulary of this checkpoint's tokenizer")
    return np.asarray(table_vd, np.float64)[ids].mean(axis=0), ids


# ------------------------------------------------------------------------------- the forward pass


@functools.lru_cache(maxsize=16)
def _forward_program(cfg: ModelConfig, attention: bool, routing: bool, mesh: Mesh,
                     rules: Rules) -> Callable:
    """The jitted forward pass of ``cfg`` on ``mesh`` sowing what is asked for: one program per
    model, flags and mesh (and prompt length), not a new trace and lowering per report."""
    _, graphdef = inference_graphdef(cfg, (Attention, MLAttention) * attention + (MoE,) * routing)

    def fn(params: nnx.State, tokens_bt: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits_btv, sown = nnx.capture(nnx.merge(graphdef, params), nnx.Intermediate)(tokens_bt)
        return logits_btv, sown_arrays(sown)

    return jax.jit(under_activation_sharding(fn, mesh, rules))


def forward(run: LoadedRun, ids: list[int], *, attention: bool = False,
            routing: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(logits [T, V] float32, intermediates without their batch dimension) of one row through the
    sharded model: ``attention_probs`` [L, N, T, T], ``routing_experts``/``routing_weights``
    [L_moe, T, R] when asked for (the layers sow them; ``nnx.capture`` collects them)."""
    program = _forward_program(run.cfg.model, attention, routing, run.mesh, run.rules)
    logits_btv, sown = jax.device_get(program(run.params, np.asarray([ids], np.int32)))
    return logits_btv[0], {name: np.take(value, 0, axis=1) for name, value in sown.items()}


# ------------------------------------------------------------------------------------ subcommands


def inspect_tokens(tokenizer: Any, text: str) -> dict[str, Any]:
    tokens = token_spans(tokenizer, text)
    words = len(text.split())
    return {"text": text, "tokenizer": tokenizer.kind, "tokens": tokens, "num_tokens": len(tokens),
            "characters": len(text), "bytes": len(text.encode("utf-8")), "words": words,
            "chars_per_token": len(text) / max(len(tokens), 1),
            "tokens_per_word": len(tokens) / words if words else None}


def inspect_next(run: Any, prompt: str, temperatures: list[float], top: int) -> dict[str, Any]:
    tok = run.tokenizer
    ids = prompt_ids(tok, prompt, run.window)
    logits_v = forward(run, ids)[0][-1]
    order = np.argsort(-logits_v, kind="stable")[:top]
    dists = [temperature_probs(logits_v, t) for t in temperatures]
    return {"prompt": prompt, "step": run.step, "temperatures": temperatures,
            "entropy_bits": [entropy_bits(p) for p in dists],
            "top": [{"id": int(i), "piece": piece(tok, int(i)), "logit": float(logits_v[i]),
                     "probs": [float(p[i]) for p in dists]} for i in order]}


def inspect_embeddings(run: Any, neighbors: str | None, analogy: list[str] | None,
                       top: int) -> dict[str, Any]:
    tok = run.tokenizer
    table_vd = np.asarray(nnx.merge(run.graphdef, run.params).embed.table_vd[...], np.float64)
    table_vd = table_vd[:tok.vocab_size]  # ids past the tokenizer's are never seen in training
    words = [neighbors] if neighbors is not None else list(analogy)
    vectors, inputs = [], []
    for word in words:
        vector, ids = word_vector(tok, table_vd, word)
        vectors.append(vector)
        inputs.append({"word": word, "form": word_form(tok, word), "ids": ids,
                       "pieces": [piece(tok, i) for i in ids], "tokens": len(ids)})
    if neighbors is not None:
        query, exclude = vectors[0], set()
    else:
        query = vectors[0] - vectors[1] + vectors[2]
        exclude = {x["ids"][0] for x in inputs if x["tokens"] == 1}  # the question's own words
    found = cosine_neighbors(table_vd, query, top, exclude)
    return {"query": "neighbors" if neighbors is not None else "analogy", "step": run.step,
            "words": inputs, "excluded": sorted(exclude),
            "results": [{"id": i, "piece": piece(tok, i), "cosine": c} for i, c in found]}


def inspect_attention(run: Any, prompt: str, layer: int, head: int | None,
                      position: int) -> dict[str, Any]:
    tok = run.tokenizer
    ids = prompt_ids(tok, prompt, run.window)
    if not -len(ids) <= position < len(ids):
        raise UsageError(f"--position {position} is outside the prompt's {len(ids)} tokens")
    position %= len(ids)
    probs_lntt = forward(run, ids, attention=True)[1]["attention_probs"]
    probs_ntt = probs_lntt[layer]
    matrix_tt = probs_ntt.mean(axis=0) if head is None else probs_ntt[head]
    return {"prompt": prompt, "step": run.step, "layer": layer, "head": "mean" if head is None else head,
            "position": position, "tokens": [{"id": i, "piece": piece(tok, i)} for i in ids],
            "weights": matrix_tt[position, :position + 1].tolist(), "matrix": matrix_tt.tolist()}


def router_biases(run: Any) -> np.ndarray:
    """[L_moe, E]: the aux-loss-free selection bias of each MoE layer's experts (``router_bias_e``);
    empty when the model has none (router_bias_rate = 0)."""
    moe = run.params.get("moe_blocks", {}).get("moe", {})
    if "router_bias_e" not in moe:
        return np.zeros((0, 0), np.float32)
    return np.asarray(jax.device_get(moe["router_bias_e"][...]))


def inspect_routing(run: Any, prompt: str) -> dict[str, Any]:
    tok = run.tokenizer
    cfg = run.cfg.model
    ids = prompt_ids(tok, prompt, run.window)
    aux = forward(run, ids, routing=True)[1]
    experts_ltr, weights_ltr = aux["routing_experts"], aux["routing_weights"]
    layers = []
    for depth, experts_tr, weights_tr in zip(cfg.moe_layer_indices, experts_ltr, weights_ltr,
                                             strict=True):
        load_e = np.bincount(experts_tr.reshape(-1), minlength=cfg.num_experts) / experts_tr.size
        layers.append({"layer": depth, "experts": experts_tr.tolist(), "weights": weights_tr.tolist(),
                       "load": load_e.tolist()})
    biases = router_biases(run)
    for layer, bias_e in zip(layers, biases, strict=False):
        layer["router_bias"] = bias_e.tolist()
    return {"prompt": prompt, "step": run.step, "num_experts": cfg.num_experts,
            "experts_per_token": cfg.experts_per_token,
            "tokens": [{"id": i, "piece": piece(tok, i)} for i in ids], "moe_layers": layers}


# --------------------------------------------------------------------------------------- tables


def _bar(x: float, width: int = 30) -> str:
    return "#" * round(max(0.0, min(1.0, x)) * width)


def _cell(text: str, width: int) -> str:
    text = text if len(text) <= width else text[:width - 1] + "~"
    return text.ljust(width)


def _tokens_table(report: dict[str, Any]) -> list[str]:
    lines = [f"{report['num_tokens']} tokens ({report['tokenizer']}), {report['characters']} "
             f"characters, {report['bytes']} bytes, {report['words']} words",
             f"{'#':>4}  {'id':>6}  {'bytes':>9}  piece"]
    for i, t in enumerate(report["tokens"]):
        span = "?" if t["start"] is None else f"{t['start']}-{t['end']}"
        lines.append(f"{i:>4}  {t['id']:>6}  {span:>9}  '{t['piece']}'")
    per_word = report["tokens_per_word"]
    lines.append(f"characters per token {report['chars_per_token']:.2f}   tokens per word "
                 + ("n/a" if per_word is None else f"{per_word:.2f}"))
    return lines


def _next_table(report: dict[str, Any]) -> list[str]:
    temps = report["temperatures"]
    lines = [f"next token after {report['prompt']!r} (step {report['step']}); probabilities "
             "= softmax(logits / T), T = 0: all on the argmax",
             f"{'rank':>4}  {'piece':<14}{'id':>6}" + "".join(f"  {'T=' + format(t, 'g'):>8}"
                                                            for t in temps)]
    for rank, row in enumerate(report["top"], 1):
        lines.append(f"{rank:>4}  {_cell(repr(row['piece']), 14)}{row['id']:>6}"
                     + "".join(f"  {p:>8.4f}" for p in row["probs"]))
    lines.append(f"{'':>4}  {'entropy (bits)':<20}"
                 + "".join(f"  {h:>8.3f}" for h in report["entropy_bits"]))
    return lines


def _embeddings_table(report: dict[str, Any]) -> list[str]:
    lines = []
    for w in report["words"]:
        if w["form"] != w["word"]:
            lines.append(f"note: {w['word']!r} is looked up as {w['form']!r}, the token the word "
                         "is in running text")
        if w["tokens"] > 1:
            lines.append(f"note: {w['word']!r} spans {w['tokens']} tokens "
                         f"({' '.join(repr(p) for p in w['pieces'])}): using the mean of their vectors")
    words = [repr(w["word"]) for w in report["words"]]
    title = (f"nearest tokens to {words[0]}" if report["query"] == "neighbors"
             else f"{words[0]} - {words[1]} + {words[2]} (the question's own tokens left out)")
    lines.append(f"{title}, cosine similarity in the input embedding table (step {report['step']})")
    lines.append(f"{'rank':>4}  {'piece':<16}{'id':>6}  {'cosine':>7}")
    for rank, r in enumerate(report["results"], 1):
        lines.append(f"{rank:>4}  {_cell(repr(r['piece']), 16)}{r['id']:>6}  {r['cosine']:>7.4f}")
    return lines


def _attention_table(report: dict[str, Any]) -> list[str]:
    pos, toks = report["position"], report["tokens"]
    lines = [f"attention of position {pos} ({toks[pos]['piece']!r}) over the prompt: layer "
             f"{report['layer']}, head {report['head']} (step {report['step']})",
             f"{'pos':>4}  {'piece':<14}  {'weight':>7}"]
    for i, w in enumerate(report["weights"]):
        lines.append(f"{i:>4}  {_cell(repr(toks[i]['piece']), 14)}  {w:>7.4f}  {_bar(w)}")
    return lines


def _routing_table(report: dict[str, Any]) -> list[str]:
    toks, k = report["tokens"], report["experts_per_token"]
    width = 9 * k
    head = "".join(f"  {'layer ' + str(layer['layer']):<{width}}" for layer in report["moe_layers"])
    lines = [f"experts (router weight) per token, top-{k} of {report['num_experts']} "
             f"(step {report['step']})", f"{'pos':>4}  {'piece':<14}{head}"]
    for i, t in enumerate(toks):
        cells = "".join("  " + " ".join(f"e{e:<2} {w:.2f}" for e, w in zip(
            layer["experts"][i], layer["weights"][i], strict=True)).ljust(width)
            for layer in report["moe_layers"])
        lines.append(f"{i:>4}  {_cell(repr(t['piece']), 14)}{cells}")
    lines.append("expert load over the prompt (fraction of assignments):")
    for layer in report["moe_layers"]:
        lines.append(f"  layer {layer['layer']}: " + "  ".join(
            f"e{e} {x:.2f}" for e, x in enumerate(layer["load"])))
    if any("router_bias" in layer for layer in report["moe_layers"]):
        lines.append("aux-loss-free selection bias (added to the router scores to choose experts):")
        for layer in report["moe_layers"]:
            lines.append(f"  layer {layer['layer']}: " + "  ".join(
                f"e{e} {b:+.3f}" for e, b in enumerate(layer["router_bias"])))
    return lines


TABLES = {"tokens": _tokens_table, "next": _next_table, "embeddings": _embeddings_table,
          "attention": _attention_table, "routing": _routing_table}


def format_table(command: str, report: dict[str, Any]) -> str:
    """The report of ``command`` as a text table."""
    return "\n".join(TABLES[command](report))
