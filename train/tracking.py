"""Where a run's metrics records go, behind one interface (``Logger``: write a record, close):
``metrics.jsonl`` (``JsonlLogger``), TensorBoard (``TensorBoardLogger``) and Weights & Biases
(``WandbLogger``). ``train/metrics.py: MetricsWriter`` picks them from the config and hands each
record to all of them; only process 0 opens any.

A record is ``{"step": int, name: number | per-layer list | [layer][expert] list, ...}``: the MoE
metrics come per layer (1-D) or per layer and expert (2-D)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from core.errors import ConfigError, first_line
from train.run_dir import RunDir


class Logger(Protocol):
    """One place metrics go."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers by name, ``step`` left out: a per-layer list becomes ``name/layerI``
    (2-D lists are left to the loggers that draw histograms)."""
    out = {}
    for name, value in record.items():
        if name != "step" and isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, list) and np.ndim(value) == 1:  # per MoE layer
            out |= {f"{name}/layer{i}": float(x) for i, x in enumerate(value)}
    return out


class JsonlLogger:
    """Appends each record as one JSON line to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """TensorBoard events in ``tensorboard/``: scalars, per-layer scalars, and a histogram per layer
    of each 2-D (layer x expert) metric."""

    def __init__(self, directory: Path):
        # tensorboardX imports torch when it is installed (over a second): only when asked for
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(directory))

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for name, value in scalars(record).items():
            self.tb.add_scalar(name, value, step)
        for name, value in record.items():
            if isinstance(value, list) and np.ndim(value) == 2:  # per MoE layer and expert
                for i, row in enumerate(value):
                    self.tb.add_histogram(f"{name}/layer{i}", np.asarray(row), step)

    def close(self) -> None:
        self.tb.close()


class WandbLogger:
    """A Weights & Biases run in project ``project``, with the run's config. One W&B run per run
    directory: its id is kept in ``wandb_run_id``, so a resume continues the same W&B run. Records
    are plotted against their ``step`` (W&B's own step only grows: a resume that repeats steps
    would otherwise be dropped). ``WANDB_MODE=offline`` keeps everything in ``wandb/``."""

    def __init__(self, project: str, run: RunDir, config: dict[str, Any]):
        try:  # wandb is optional (the `wandb` extra) and slow to import: only when run.wandb is set
            import wandb
        except ImportError:
            raise ConfigError("run.wandb", "needs the wandb package: pip install -e '.[wandb]'") from None
        if not run.wandb_run_id.is_file():
            run.wandb_run_id.write_text(secrets.token_hex(4) + "\n")  # W&B's id alphabet
        try:
            self.run = wandb.init(project=project, dir=str(run.path), config=config,
                                  id=run.wandb_run_id.read_text().strip(), resume="allow",
                                  name=run.path.name)
        except Exception as e:  # wandb raises many types (no login, no network, a bad entity)
            raise ConfigError("run.wandb", f"Weights & Biases did not start: {first_line(e)} (log "
                              "in with `wandb login`, or set WANDB_MODE=offline)") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, record: dict[str, Any]) -> None:
        self.run.log({"step": int(record["step"]), **scalars(record)})

    def close(self) -> None:
        self.run.finish()
