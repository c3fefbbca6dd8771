"""The run directory, and the only code that knows its layout: ``config.yaml`` (the fully resolved
config, written atomically), the tokenizer files (``data/tokenizer.py`` names them), ``metrics.jsonl``,
``tensorboard/``, ``logs/``, ``expert_load.png``, and ``checkpoints/<step>/`` and
``damaged_checkpoints/`` (whose contents ``train/checkpoint.py`` writes). Training, fine-tuning,
evaluation and conversion all go through ``RunDir``.

Under ``jax.distributed`` every process holds a ``RunDir`` of the same shared directory; process 0
writes, and ``prepare`` and ``tokenizer_for`` keep the others in step with it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import yaml

from core.errors import ConfigError
from data.tokenizer import (
    TOKENIZER_FILE,
    TOKENIZER_FILES,
    Tokenizer,
    load_tokenizer,
    make_tokenizer,
    save_tokenizer,
)
from sharding.mesh import broadcast_from_0, sync_processes
from train.config import Config, config_from_dict, dump_yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
DAMAGED_DIR = "damaged_checkpoints"  # checkpoints that failed verification, kept for inspection


def write_atomically(path: Path, data: bytes) -> None:
    """Writes ``path`` through a temporary file and a rename: a crash leaves the old or the new."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class RunDir:
    """One run directory (it may not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config_file = property(lambda self: self.path / CONFIG_FILE)
    metrics_file = property(lambda self: self.path / METRICS_FILE)
    checkpoints = property(lambda self: self.path / "checkpoints")
    damaged_checkpoints = property(lambda self: self.path / DAMAGED_DIR)
    tensorboard = property(lambda self: self.path / "tensorboard")
    logs = property(lambda self: self.path / "logs")
    expert_load_picture = property(lambda self: self.path / "expert_load.png")

    @classmethod
    def of_checkpoint(cls, path: str | Path) -> tuple[RunDir, int | None]:
        """(run directory, step or None for the latest) from a run directory or one of its
        ``checkpoints/<step>`` directories; ValueError for anything else."""
        path = Path(path)
        if (path / CONFIG_FILE).is_file():
            return cls(path), None
        if path.parent.name == "checkpoints" and (path.parent.parent / CONFIG_FILE).is_file():
            if not path.name.isdigit():
                raise ValueError(f"{path} is not a checkpoint step directory")
            if not path.is_dir():
                raise ValueError(f"{path} does not exist")
            return cls(path.parent.parent), int(path.name)
        raise ValueError(f"{path} is neither a meshlm run directory (with config.yaml) nor one of its "
                         "checkpoints/<step> directories")

    # -------------------------------------------------------------------------------- the config

    def read_config(self) -> Config:
        """The run's saved config; ValueError if the directory or its config is missing or invalid."""
        if not self.path.is_dir():
            raise ValueError(f"{self.path} does not exist")
        if not self.config_file.is_file():
            raise ValueError(f"{self.path} is not a meshlm run directory (it has no {CONFIG_FILE})")
        try:
            raw = yaml.safe_load(self.config_file.read_text())
            if not isinstance(raw, dict):
                raise TypeError("it holds no mapping of sections")
            return config_from_dict(raw)
        except (yaml.YAMLError, ConfigError, TypeError, AttributeError) as e:
            raise ValueError(f"{self.config_file} is not a valid meshlm config ({e})") from None

    def write_config(self, cfg: Config) -> None:
        """Writes ``config.yaml`` atomically (the directory must exist)."""
        write_atomically(self.config_file, dump_yaml(cfg).encode())

    def prepare(self, cfg: Config) -> None:
        """Creates the directory and writes the config, or checks that an existing run trained the
        same model (keys added to ModelConfig since then take their defaults). ConfigError if it
        holds another model or cannot be written; every process gets the same answer."""
        if self.config_file.is_file():
            try:
                previous = yaml.safe_load(self.config_file.read_text()) or {}
            except yaml.YAMLError:
                raise ConfigError("run.dir", f"{self.config_file} is not valid YAML") from None
            defaults = Config().to_dict()["model"]
            if {**defaults, **(previous.get("model") or {})} != cfg.to_dict()["model"]:
                raise ConfigError("run.dir", f"{self.path} holds a run of a different model; choose "
                                  "another run.dir or keep the model.* settings")
        sync_processes("meshlm: run directory checked")  # every process read it before it changes
        problem = ""
        if jax.process_index() == 0:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                self.write_config(cfg)
            except OSError as e:
                problem = f"cannot write to {self.path}: {e.strerror or e}"
        if broadcast_from_0(1 if problem else 0):  # the others must not wait for process 0 forever
            raise ConfigError("run.dir", problem or "process 0 cannot write to the run directory")

    # ----------------------------------------------------------------------------- the tokenizer

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer saved in the run; ValueError if it is missing or invalid."""
        return load_tokenizer(self.path)

    def save_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Writes the tokenizer's files through a scratch directory (process 0), its metadata file
        last: a crash never leaves half a tokenizer."""
        if jax.process_index() != 0:
            return
        scratch = self.path / ".tokenizer.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        save_tokenizer(tokenizer, scratch)
        for name in sorted(os.listdir(scratch), key=lambda n: n == TOKENIZER_FILE):
            os.replace(scratch / name, self.path / name)
        scratch.rmdir()

    def tokenizer_for(self, spec: str) -> Tokenizer:
        """The run's tokenizer: the one saved here when resuming, else a new one from ``spec``,
        saved here."""
        resuming = (self.path / TOKENIZER_FILE).is_file()
        sync_processes("meshlm: tokenizer looked up")  # before process 0 may write it
        if resuming:
            return self.load_tokenizer()
        tokenizer = make_tokenizer(spec)
        self.save_tokenizer(tokenizer)
        return tokenizer

    def tokenizer_spec(self) -> str:
        """A ``data.tokenizer`` spec that rebuilds exactly the tokenizer saved here."""
        return "byte" if self.load_tokenizer().kind == "byte" else f"run:{self.path}"

    def copy_tokenizer_to(self, other: RunDir) -> None:
        """Copies the tokenizer files, as they are, into ``other`` (which must exist)."""
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                shutil.copy2(self.path / name, other.path / name)

    # ---------------------------------------------------------------------- metrics, checkpoints

    def trim_metrics(self, step: int) -> None:
        """On resume: drops records past ``step`` (they are trained again) and any torn last line
        from ``metrics.jsonl`` (process 0)."""
        if jax.process_index() != 0 or not self.metrics_file.is_file():
            return
        kept = []
        for line in self.metrics_file.read_bytes().decode("utf-8", "replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and int(record.get("step", 0)) <= step:
                kept.append(line + "\n")
        write_atomically(self.metrics_file, "".join(kept).encode())

    def losses(self) -> dict[int, float]:
        """{step: loss} from ``metrics.jsonl`` (the last record of a step wins)."""
        out = {}
        for line in self.metrics_file.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                out[int(record["step"])] = record["loss"]
        return out

    def committed_steps(self) -> list[int]:
        """The committed checkpoint steps, oldest first (orbax's listing: the temporary directories
        of unfinished saves are never listed)."""
        return sorted(ocp.utils.checkpoint_steps(self.checkpoints))
