"""Where metrics go: a tqdm progress bar on the console, ``metrics.jsonl``, TensorBoard events and
the MoE expert-load picture. Only process 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm


class MetricsWriter:
    """Appends one JSON object per call to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool):
        self.enabled = jax.process_index() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if not isinstance(v, (int, str, list, dict)) else v)
                 for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            step = int(clean["step"])
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
                elif isinstance(v, list) and np.ndim(v) == 1:  # per MoE layer
                    for i, x in enumerate(v):
                        self.tb.add_scalar(f"{k}/layer{i}", x, step)
                elif isinstance(v, list) and np.ndim(v) == 2:  # per MoE layer and expert
                    for i, row in enumerate(v):
                        self.tb.add_histogram(f"{k}/layer{i}", np.asarray(row), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, disable=not enabled or jax.process_index() != 0,
                dynamic_ncols=True, unit="step")


def write_expert_load_png(path: str | Path, load_le: np.ndarray, layer_ids: list[int],
                          title: str) -> None:
    """A heatmap of the fraction of routed tokens per expert (columns) in each MoE layer (rows,
    labelled with their ``layer_ids`` in the model)."""
    from matplotlib.figure import Figure

    layers, experts = load_le.shape
    fig = Figure(figsize=(min(3 + 0.5 * experts, 16), min(2 + 0.45 * layers, 12)))
    ax = fig.add_subplot()
    image = ax.imshow(load_le, cmap="viridis", vmin=0, aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    if experts <= 32:  # else matplotlib's own ticks
        ax.set_xticks(range(experts))
    ax.set_yticks(range(layers), [str(i) for i in layer_ids])
    if layers * experts <= 256:
        for (i, j), value in np.ndenumerate(load_le):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(image, ax=ax, label="fraction of routed tokens")
    ax.set_title(f"{title}\nbalanced = {1 / experts:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
