"""Where a run's metrics go: ``metrics.jsonl``, TensorBoard and Weights & Biases (``MetricsWriter``
over ``train/tracking.py``'s loggers), the console progress bar, the bookkeeping of the steps in
flight (``StepLog``: tokens/s, MFU, skipped non-finite steps, the mean expert load) and the MoE
expert-load picture. Only process 0 writes.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from core.errors import RunError
from model.moe import load_max_over_mean
from train.checkpoint import warn
from train.config import Config
from train.run_dir import RunDir
from train.store import run_path
from train.tracking import JsonlLogger, Logger, TensorBoardLogger, WandbLogger


class MetricsWriter:
    """Hands each record to the loggers the config asks for (``train/tracking.py``):
    ``metrics.jsonl`` always, TensorBoard with ``run.tensorboard``, Weights & Biases with
    ``run.wandb``. Only process 0 writes."""

    def __init__(self, run: RunDir, cfg: Config):
        self.enabled = jax.process_index() == 0
        self.loggers: list[Logger] = []
        if not self.enabled:
            return
        self.loggers.append(JsonlLogger(run.metrics_file))
        if cfg.run.wandb:  # first: the one that may refuse to start (then nothing is left open)
            self.loggers.append(WandbLogger(cfg.run.wandb, run, cfg.to_dict()))
        if cfg.run.tensorboard:
            self.loggers.append(TensorBoardLogger(run.tensorboard))

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if not isinstance(v, (int, str, list, dict)) else v)
                 for k, v in record.items()}
        for logger in self.loggers:
            logger.write(clean)

    def flush(self) -> None:
        """Makes every record written so far durable (called before each checkpoint)."""
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, disable=not enabled or jax.process_index() != 0,
                dynamic_ncols=True, unit="step")


class StepLog:
    """The metrics of the steps in flight: fetched once at most ``train.steps_in_flight`` steps
    behind (bounding dispatch-ahead), written every ``train.log_every`` steps with tokens/s and MFU
    (timed from the first step: compilation is not counted), skipped non-finite steps counted (more
    than ``train.max_skipped_steps`` in a row end the run), MoE expert load summed.

    Intervals are timed by when steps complete, not when they are fetched: a step is fetched up to
    ``steps_in_flight`` steps late, and the final drain fetches the last ones all at once (which
    made the last interval of a host-bound run read over twice the real rate)."""

    def __init__(self, cfg: Config, writer: MetricsWriter, start: int, flops_per_token: float,
                 peak_flops: float, latest_checkpoint: Callable[[], int | None]):
        self.cfg, self.writer, self.latest_checkpoint = cfg, writer, latest_checkpoint
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.in_flight: collections.deque[tuple[int, dict]] = collections.deque()
        self.completed_at: dict[int, float] = {}  # steps in flight seen completed: when
        self.last: dict[str, Any] = {"step": start}
        self.clock: tuple[float | None, int] = (None, start)  # (time, step) of the last log
        self.load_sum: np.ndarray | float = 0.0  # [MoE layers, experts], summed over fetched steps
        self.load_steps = 0
        self.interval_load: list[np.ndarray] = []  # expert_load of each step since the last log line
        self.skipped_total = self.skipped_in_a_row = 0
        self.bar = progress_bar(cfg.train.steps, start, cfg.run.progress)

    def push(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Records step ``step``'s (device) metrics, fetching the oldest beyond the bound."""
        self.in_flight.append((step, metrics))
        self._note_completed()
        self.drain(self.cfg.train.steps_in_flight)

    def _note_completed(self) -> None:
        """Times the steps in flight whose outputs are ready now, oldest first: the device runs them
        in order, so the first one not ready ends the scan. A step is timed to within one push; a
        step not seen ready before its fetch is timed when the fetch returns."""
        now = time.perf_counter()
        for step, metrics in self.in_flight:
            if step in self.completed_at:
                continue
            if not all(x.is_ready() for x in jax.tree.leaves(metrics)):
                break
            self.completed_at[step] = now

    def drain(self, limit: int = 0) -> None:
        """Fetches metrics of the oldest steps until at most ``limit`` remain in flight."""
        while len(self.in_flight) > limit:
            step, metrics = self.in_flight.popleft()
            values = {k: v.tolist() if np.ndim(v) else float(v)  # MoE per-layer lists
                      for k, v in jax.device_get(metrics).items()}
            self._count_skip(step, values)
            if "expert_load" in values:
                self.load_sum = self.load_sum + np.asarray(values["expert_load"])
                self.load_steps += 1
                self.interval_load.append(np.asarray(values["expert_load"]))
            self.bar.update(1)
            self.last.update(step=step, **values)
            self._log(step, values, self.completed_at.pop(step, time.perf_counter()))

    def _log(self, step: int, values: dict[str, Any], now: float) -> None:
        """Writes step ``step``'s record, which completed at ``now``, when it is due (a log step or
        the last)."""
        since, since_step = self.clock
        if since is None:  # the first step includes compilation: time from here
            self.clock = (now, step)
            since, since_step = self.clock
        t = self.cfg.train
        if step % t.log_every and step != t.steps:
            return
        elapsed = now - since
        tps = (step - since_step) * t.batch_size * t.seq_len / elapsed if elapsed > 0 else 0.0
        mfu = tps * self.flops_per_token / self.peak_flops if self.peak_flops else 0.0
        self.last.update(tokens_per_s=tps, mfu=mfu)
        routing = self._interval_routing()
        self.writer.write({"step": step, **values, **routing, "tokens_per_s": tps, "mfu": mfu,
                           "skipped_steps": self.skipped_total})
        postfix = {"loss": f"{values['loss']:.3f}"}
        if routing:  # what the routing does, next to the loss: balance and drops
            postfix |= {"load": f"{routing['moe_interval_load_max_over_mean']:.2f}",
                        "dropped": f"{values['moe_dropped_frac']:.1%}"}
        self.bar.set_postfix(**postfix, tok_s=f"{tps:,.0f}", mfu=f"{mfu:.1%}")
        self.clock = (now, step)

    def _interval_routing(self) -> dict[str, Any]:
        """An MoE run's expert balance over the steps since the previous log line: the max/mean of
        each layer's mean expert load (``moe_interval_load_max_over_mean_per_layer``, and its worst
        layer). One batch's load (``moe_load_max_over_mean``) also follows what that batch's text
        is about -- experts specialise -- while this is the load the balancing controls."""
        if not self.interval_load:
            return {}
        per_layer = np.asarray(load_max_over_mean(np.mean(self.interval_load, axis=0)))
        self.interval_load = []
        return {"moe_interval_load_max_over_mean": float(per_layer.max()),
                "moe_interval_load_max_over_mean_per_layer": per_layer.tolist()}

    def _count_skip(self, step: int, values: dict[str, Any]) -> None:
        """Counts skipped (non-finite) steps; too many in a row end the run."""
        if not values.get("skipped"):
            self.skipped_in_a_row = 0
            return
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        max_skipped = self.cfg.train.max_skipped_steps
        warn(f"step {step}: non-finite loss ({values['loss']}) or gradient norm "
             f"({values['grad_norm']}); update skipped ({self.skipped_in_a_row} in a row)")
        if self.skipped_in_a_row > max_skipped:
            raise RunError(f"stopped at step {step}: {self.skipped_in_a_row} steps in a row had a "
                           f"non-finite loss or gradient norm (train.max_skipped_steps="
                           f"{max_skipped}); the last checkpoint is {self.latest_checkpoint() or 'none'}")

    def close(self) -> None:
        self.bar.close()


def write_expert_load_png(path: str | os.PathLike, load_le: np.ndarray, layer_ids: list[int],
                          title: str) -> None:
    """A heatmap of the fraction of routed tokens per expert (columns) in each MoE layer (rows,
    labelled with their ``layer_ids`` in the model)."""
    from matplotlib.figure import Figure  # heavy (about a second): only when a picture is drawn

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
    with run_path(path).open("wb") as f:  # a local file or an object (one upload)
        fig.savefig(f, format="png", dpi=100)
