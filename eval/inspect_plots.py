"""Figures for ``python -m eval inspect``, drawn from its JSON reports with matplotlib (Agg backend,
no display needed): token strips, next-token bars, neighbour bars, attention and routing heatmaps."""

from __future__ import annotations

from typing import Any

import numpy as np


def _labels(tokens: list[dict[str, Any]]) -> list[str]:
    return [repr(t["piece"])[1:-1] or " " for t in tokens]


def plot(command: str, report: dict[str, Any], path: str) -> None:
    """Draws ``report`` (the ``command``'s JSON object) into the PNG file ``path``."""
    # heavy (about a second), and the Agg backend must be chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # only after the backend is chosen

    fig = DRAW[command](plt, report)
    try:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def _tokens(plt, report: dict[str, Any]):
    tokens = report["tokens"]
    fig, ax = plt.subplots(figsize=(min(2 + 0.6 * len(tokens), 30), 1.8))
    colors = plt.get_cmap("tab20").colors
    for i, t in enumerate(tokens):
        ax.add_patch(plt.Rectangle((i, 0), 0.95, 1, color=colors[i % len(colors)]))
        ax.text(i + 0.47, 0.6, repr(t["piece"])[1:-1], ha="center", va="center", fontsize=8)
        ax.text(i + 0.47, 0.2, str(t["id"]), ha="center", va="center", fontsize=6)
    ax.set_xlim(0, max(len(tokens), 1))
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.set_title(f"{report['num_tokens']} tokens, {report['chars_per_token']:.2f} characters per token")
    return fig


def _next(plt, report: dict[str, Any]):
    rows, temps = report["top"], report["temperatures"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    x = np.arange(len(rows))
    width = 0.8 / len(temps)
    for j, t in enumerate(temps):
        ax.bar(x + j * width, [r["probs"][j] for r in rows], width,
               label=f"T={t:g} (H={report['entropy_bits'][j]:.2f} bits)")
    ax.set_xticks(x + 0.4 - width / 2, [repr(r["piece"]) for r in rows], rotation=45, ha="right")
    ax.set_ylabel("probability")
    ax.set_title(f"next token after {report['prompt']!r}")
    ax.legend(fontsize=8)
    return fig


def _embeddings(plt, report: dict[str, Any]):
    rows = report["results"]
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(rows) + 1.2))
    ax.barh(np.arange(len(rows))[::-1], [r["cosine"] for r in rows])
    ax.set_yticks(np.arange(len(rows))[::-1], [repr(r["piece"]) for r in rows])
    ax.set_xlabel("cosine similarity")
    words = [w["word"] for w in report["words"]]
    ax.set_title(f"neighbors of {words[0]!r}" if report["query"] == "neighbors"
                 else f"{words[0]!r} - {words[1]!r} + {words[2]!r}")
    return fig


def _attention(plt, report: dict[str, Any]):
    matrix = np.asarray(report["matrix"])
    labels = _labels(report["tokens"])
    size = min(3 + 0.35 * len(labels), 24)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="viridis", vmin=0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.axhline(report["position"], color="red", linewidth=0.8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(f"layer {report['layer']}, head {report['head']}")
    fig.colorbar(image, ax=ax, fraction=0.04)
    return fig


def _routing(plt, report: dict[str, Any]):
    labels = _labels(report["tokens"])
    layers = report["moe_layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(3 + 2.5 * len(layers), 2 + 0.3 * len(labels)),
                             squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        weights_te = np.zeros((len(labels), report["num_experts"]))
        for t, (experts, weights) in enumerate(zip(layer["experts"], layer["weights"], strict=True)):
            weights_te[t, experts] = weights
        ax.imshow(weights_te, cmap="magma", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(report["num_experts"]))
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(f"layer {layer['layer']}")
    return fig


DRAW = {"tokens": _tokens, "next": _next, "embeddings": _embeddings, "attention": _attention,
        "routing": _routing}
