"""Config = model + mesh + data + optim + train + checkpoint + run + finetune: frozen dataclasses
(each key declared with its meaning) loaded from a YAML preset plus ``section.key=value``
overrides. ``train/validate.py`` checks the whole before anything compiles.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from core.errors import ConfigError, first_line
from core.options import option
from model.config import RUNTIME_KEYS, ModelConfig
from model.lora import TARGETS, LoRASpec, unmatched_targets
from sharding.mesh import MeshConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = CONFIG_DIR / "default.yaml"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it becomes tokens.

    source: ``stdlib`` (the installed Python standard library's .py files, present on every machine),
    ``text:GLOB`` (local UTF-8 text files, prepared once into ArrayRecord by a tensorflow-datasets
    builder) or ``tfds:NAME[:SPLIT[:FIELD]]`` (a tfds catalog dataset read from ``data_dir``), or
    ``jsonl:GLOB[:FIELD]`` (one document per JSON line, its FIELD, default ``text``),
    ``parquet:GLOB[:FIELD]`` (a string column of parquet files, through pyarrow),
    ``hf:PATH[:SPLIT[:FIELD]]`` (a Hugging Face ``datasets`` directory, saved or of data files, or
    parquet/JSON-lines/Arrow/CSV data files) or ``hf-stream:PATH[:SPLIT[:FIELD]]`` (the same data files
    streamed, never indexed), or ``chat:GLOB[:FIELD]`` (conversations for supervised fine-tuning:
    JSON-lines or parquet files, by extension, whose FIELD, default ``messages``, is an OpenAI-style
    list of role/content messages; each rendered with the tokenizer's chat template and validated when
    opened, a bad record one error line naming its file and line; only the assistant's tokens are
    trained, from the template's ``{% generation %}`` blocks or else turn by turn; one conversation is
    one row, cut on the right to ``train.seq_len + 1`` tokens and dropped with no assistant token left;
    ``token_cache`` is refused). mix: ``SPEC:WEIGHT,...`` draws documents from several sources by
    weight, in place of ``source``. tokenizer: ``byte``, ``sentencepiece:PATH.model``, ``hf:PATH`` (a
    Hugging Face tokenizer.json or its directory) or ``run:RUN_DIR`` (the tokenizer saved in a run, e.g.
    an import). token_cache: documents are tokenized once into ArrayRecord under ``cache_dir`` and read
    as ids by later runs (the same batches).
    """

    source: str = option("stdlib", "stdlib, text:GLOB, jsonl:GLOB[:FIELD], tfds:NAME[:SPLIT[:FIELD]], "
                         "parquet:GLOB[:FIELD], hf:PATH[:SPLIT[:FIELD]], hf-stream:PATH[:SPLIT[:FIELD]] or "
                         "chat:GLOB[:FIELD] (conversations; only assistant tokens trained)")
    mix: str = option("", "SPEC:WEIGHT,SPEC:WEIGHT,...: documents drawn from these sources by weight, "
                      "in place of data.source (empty: data.source alone)")
    tokenizer: str = option("byte", "byte, sentencepiece:PATH.model, hf:PATH or run:RUN_DIR")
    data_dir: str = option("", "tensorflow-datasets data_dir for tfds: sources (e.g. gs://bucket/tfds)")
    cache_dir: str = option("", "where text:, jsonl: and hf: sources and token caches are prepared; "
                            "empty = ~/.cache/meshlm/tfds")
    token_cache: bool = option(False, "tokenize each random-access source once into ArrayRecord under "
                               "cache_dir and read token ids from it in later runs")
    eval_fraction: float = option(0.05, "documents held out for evaluation (sources without an "
                                  "evaluation split of their own)")
    prefetch: int = option(2, "batches prepared ahead by a background thread (0: none)")
    shuffle_tokens: int = option(1 << 20, "chunks are shuffled within windows of about this many tokens")
    streams: int = option(8, "independent input streams; any process count dividing it sees the same "
                          "batches")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``; global-norm clipping."""

    lr: float = option(3e-3, "peak learning rate")
    min_lr_ratio: float = option(0.1, "the cosine decays to this fraction of lr")
    warmup_steps: int = option(50, "steps of linear warmup from 0")
    decay_steps: int = option(0, "step at which the decay reaches its floor; 0 = train.steps")
    b1: float = option(0.9, "Adam's first-moment decay")
    b2: float = option(0.95, "Adam's second-moment decay")
    eps: float = option(1e-8, "Adam's epsilon")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay (not on norm scales and biases)")
    clip_norm: float = option(1.0, "global gradient-norm clipping; 0 = none")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: global batch (rows), sequence length, microbatches for gradient accumulation."""

    steps: int = option(1000, "optimizer steps of the run")
    batch_size: int = option(32, "global batch, in rows (of all processes together)")
    seq_len: int = option(128, "tokens per row (packed documents)")
    microbatches: int = option(1, "gradient accumulation: the batch is split into this many parts")
    seed: int = option(0, "seeds initialisation, data order and sampling")
    log_every: int = option(10, "steps between metrics.jsonl records")
    eval_every: int = option(0, "steps between evaluations; 0 = only at the end")
    eval_batches: int = option(4, "batches per evaluation; 0 = one full pass over the held-out split")
    steps_in_flight: int = option(4, "bounded dispatch-ahead (the emulated CPU mesh deadlocks "
                                  "without it)")
    max_skipped_steps: int = option(10, "non-finite steps skipped in a row before the run stops "
                                    "(0: none)")
    sample_tokens: int = option(200, "tokens sampled at the end of the run (0: no sample)")
    sample_prompt: str = option("def ", "the prompt of that sample")
    profile: str = option("", "START:END: a jax.profiler trace of steps START to END (inclusive) in "
                          "run.dir/tensorboard/plugins/profile, for TensorBoard's profile plugin; "
                          "empty = none")

    def profile_steps(self) -> tuple[int, int] | None:
        """(START, END) of ``profile``, or None when it is empty; ValueError when it is not two
        whole numbers ``START:END`` (their range is checked by ``train/validate.py``)."""
        if not self.profile:
            return None
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", self.profile, re.ASCII)
        if match is None:
            raise ValueError(f"expected START:END (steps, e.g. 10:12), got {self.profile!r}")
        return int(match[1]), int(match[2])


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``run.dir/checkpoints``: every N steps (0: only at the end), keep K."""

    every: int = option(200, "steps between checkpoints; 0 = only at the end")
    keep: int = option(3, "checkpoints kept (the newest)")
    async_save: bool = option(True, "save in the background while training goes on")
    restart_if_damaged: bool = option(False, "when no checkpoint of an existing run verifies, start "
                                      "again from step 0 (they move to damaged_checkpoints/, "
                                      "metrics.jsonl is archived) instead of refusing")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where the run lives and how the process starts."""

    dir: str = option("runs/default", "the run directory (an existing one is resumed): a local or "
                      "mounted path, gs://BUCKET/PATH or s3://BUCKET/PATH (an S3-compatible server "
                      "is named by AWS_ENDPOINT_URL)")
    lock_ttl: float = option(60.0, "object-store run.dir: seconds the trainer's lock lease lives "
                             "unrefreshed (it is refreshed every third of it); a killed trainer's "
                             "lock is taken over this long after its last refresh")
    distributed: bool = option(False, "jax.distributed.initialize() (one process per host on TPU pods)")
    coordinator: str = option("", "host:port of process 0; empty = auto-detect (TPU VMs, SLURM, ...)")
    num_processes: int = option(0, "with coordinator: how many processes join")
    process_id: int = option(-1, "with coordinator: this process's index")
    init_timeout: int = option(120, "seconds to wait for every process to join the coordinator")
    heartbeat_timeout: int = option(100, "seconds without a heartbeat before a process counts as dead")
    cpu_devices: int = option(8, "CPU devices to emulate per process when JAX runs on the host CPU")
    peak_flops: float = option(0.0, "FLOP/s of the whole job for MFU; 0 = measured (CPU) or published "
                               "(TPU)")
    tensorboard: bool = option(True, "also write TensorBoard events")
    wandb: str = option("", "also log to this Weights & Biases project (WANDB_MODE=offline keeps "
                        "it on disk); empty = none")
    step_timeout: float = option(0.0, "seconds a step may take before every process ends with an "
                                 "error; 0 = 10x the median step after warm-up; -1 = never")
    progress: bool = option(True, "show a progress bar")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning from a meshlm run directory ``base`` ("" = pre-training): its model, tokenizer and
    checkpoint ``base_step`` (0: its latest). ``method``: ``lora`` trains only adapters of rank
    ``lora_rank`` (update scaled by ``lora_alpha / lora_rank``, input dropout ``lora_dropout``) on
    the comma-separated ``lora_targets`` among q,k,v,o,gate,up,down (``lora_experts``: the MoE
    experts' gate,up,down too); ``full`` trains every weight with a fresh optimizer, except the MoE
    routers with ``freeze_router``. ``objective``: ``sft`` (next-token loss), ``dpo`` or ``simpo``
    (preference pairs of ``data.source=pref:GLOB``; ``train/preference.py``)."""

    base: str = option("", "the run directory to fine-tune; empty = pre-training")
    base_step: int = option(0, "the base run's checkpoint to start from; 0 = its latest")
    method: Literal["lora", "full"] = option("lora", "train LoRA adapters only, or every weight")
    lora_rank: int = option(8, "rank r of the adapters")
    lora_alpha: float = option(16.0, "the adapters' update is scaled by lora_alpha / lora_rank")
    lora_dropout: float = option(0.0, "dropout on the adapters' input")
    lora_targets: str = option("q,k,v,o,gate,up,down", "comma-separated projections to adapt")
    lora_experts: bool = option(False, "also adapt the MoE experts' gate, up and down")
    freeze_router: bool = option(False, "full fine-tuning: keep the MoE routers fixed")
    objective: Literal["sft", "dpo", "simpo"] = option(
        "sft", "sft: next-token loss; dpo: Direct Preference Optimization against the frozen base; "
        "simpo: reference-free SimPO (dpo and simpo read data.source=pref:GLOB)")
    dpo_beta: float = option(0.1, "dpo: beta, the scale of the implicit reward")
    dpo_label_smoothing: float = option(0.0, "dpo: epsilon of conservative DPO, the assumed "
                                        "fraction of flipped labels, in [0, 0.5)")
    simpo_beta: float = option(2.0, "simpo: beta, the scale of the length-normalised reward")
    simpo_gamma: float = option(0.5, "simpo: the target reward margin gamma")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def problems(self, model: ModelConfig) -> list[tuple[str, str]]:
        """(key, message) for every inconsistency of the section, for the base ``model``."""
        out = []
        if self.base_step < 0:
            out.append(("base_step", f"must be >= 0 (0: the latest), got {self.base_step}"))
        if self.lora_rank < 1:
            out.append(("lora_rank", f"must be >= 1, got {self.lora_rank}"))
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            out.append(("lora_alpha", f"must be a positive number, got {self.lora_alpha}"))
        if not 0 <= self.lora_dropout < 1:
            out.append(("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}"))
        out += self.objective_problems()
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            out.append(("lora_targets", f"unknown LoRA target {unknown[0]!r} (known: "
                        f"{','.join(TARGETS)})"))
        elif not self.targets:
            out.append(("lora_targets", f"names no target (choose from {','.join(TARGETS)})"))
        elif self.method == "lora" and len(unmatched_targets(
                model, LoRASpec(targets=self.targets, experts=self.lora_experts))) == len(self.targets):
            out.append(("lora_targets", f"{self.lora_targets} match no weight of the base model (a "
                        "GELU MLP has no gate; an all-MoE model without shared experts has no dense "
                        "MLP: set finetune.lora_experts=true)"))
        return out


    def objective_problems(self) -> list[tuple[str, str]]:
        """(key, message) for every bad preference-loss setting."""
        out = []
        for key in ("dpo_beta", "simpo_beta"):
            if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
                out.append((key, f"must be a positive number, got {getattr(self, key)}"))
        if not 0 <= self.dpo_label_smoothing < 0.5:
            out.append(("dpo_label_smoothing", f"must be in [0, 0.5), got {self.dpo_label_smoothing}"))
        if not (self.simpo_gamma >= 0 and math.isfinite(self.simpo_gamma)):
            out.append(("simpo_gamma", f"must be a number >= 0, got {self.simpo_gamma}"))
        return out


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run: RunConfig = RunConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _every_key(section: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(section))


# What a resumed run may change (README, "Resuming with another config"): the keys that change how
# the same run is computed -- the model's runtime keys, the mesh, where data is read from and how
# far ahead, microbatching, evaluation, logging, sampling, checkpoints and the processes. Every
# other key fixes the model, the data order or the optimisation and must stay as the run started;
# train/validate.py (check_resume) names the first that changed. train.steps may change while the
# learning-rate schedule keeps its length (optim.decay_steps, which defaults to train.steps).
RESUMABLE: dict[str, frozenset[str]] = {
    "model": RUNTIME_KEYS,
    "mesh": _every_key(MeshConfig),
    "data": frozenset({"data_dir", "cache_dir", "prefetch", "token_cache"}),
    "optim": frozenset(),
    "train": frozenset({"steps", "microbatches", "log_every", "eval_every", "eval_batches",
                        "steps_in_flight", "max_skipped_steps", "sample_tokens", "sample_prompt",
                        "profile"}),
    "checkpoint": _every_key(CheckpointConfig),
    "run": _every_key(RunConfig),
    "finetune": frozenset(),
}
# Why a section's other keys are fixed (the end of a refusal's error line).
FIXED_BECAUSE = {
    "model": "it changes the model's parameters or the function they compute",
    "data": "it changes which tokens the run trains on, or their order",
    "optim": "it changes the optimisation",
    "train": "it changes the batches or the optimisation",
    "finetune": "it changes what is fine-tuned",
}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` converted to the field's type, or a ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if annotation in NUMBERS:
        return _number(key, value, annotation)
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


NUMBERS = {int: "an integer", float: "a number"}


def _number(key: str, value: Any, kind: type) -> int | float:
    """``value`` as an int or a float: a number (not a boolean; for an int, a whole one) or a string
    that parses as one; else a ConfigError naming ``key``."""
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if kind is float or isinstance(value, int):
            return kind(value)
        if value.is_integer():
            return int(value)
    raise ConfigError(key, f"expected {NUMBERS[kind]}, got {value!r}")


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{name}.{key}", f"unknown key (known: {known})")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


class _ConfigLoader(yaml.SafeLoader):
    """YAML without YAML 1.1's base-60 numbers: ``train.profile=2:3`` is the text 2:3, not 123."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        tag = super().resolve(kind, value, implicit)
        if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and ":" in str(value):
            return "tag:yaml.org,2002:str"
        return tag


def _yaml(text: str) -> Any:
    """The one YAML document of ``text`` through ``_ConfigLoader`` (a SafeLoader: no Python objects)."""
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value parsed as YAML scalar)."""
    if "=" not in text:
        raise ConfigError(text, "overrides look like section.key=value")
    dotted, raw = text.split("=", 1)
    if dotted.count(".") != 1:
        raise ConfigError(dotted, "overrides look like section.key=value")
    section, key = dotted.split(".")
    if section not in SECTIONS:
        raise ConfigError(dotted, f"unknown section {section!r} (known: {', '.join(SECTIONS)})")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = raw
    return section, key, value


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", f"no such file: {path}")
    try:
        raw = _yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path} is not valid YAML ({first_line(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError("config", f"{path} must hold a mapping of sections")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(str(section), f"unknown section in {path} (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(str(section), f"must be a mapping in {path}")
    return raw


def build_config(preset: dict[str, dict[str, Any]], overrides: list[str]) -> Config:
    """Preset sections, then overrides in order; types checked, cross-field checks not yet."""
    merged = {section: dict(values) for section, values in preset.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        merged.setdefault(section, {})[key] = value
    return Config(**{name: _build_section(name, merged.get(name, {})) for name in SECTIONS})


def preset_path(name: str | Path | None, default: Path = DEFAULT_PRESET) -> Path:
    """The YAML file a command's CONFIG names: a path, or the name of a preset in configs/
    (``tiny`` is configs/tiny.yaml); ``default`` when none is given."""
    if not name:
        return default
    path = Path(name)
    if not path.is_file() and (CONFIG_DIR / f"{name}.yaml").is_file():
        return CONFIG_DIR / f"{name}.yaml"
    return path


def load_config(path: str | Path | None, overrides: list[str]) -> Config:
    """Config from a YAML preset (a path or a preset name; default: configs/default.yaml) plus
    overrides."""
    return build_config(load_yaml(preset_path(path)), overrides)


def config_from_dict(raw: dict[str, dict[str, Any]]) -> Config:
    """The inverse of ``Config.to_dict`` (e.g. a run directory's config.yaml)."""
    return build_config(raw, [])


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
