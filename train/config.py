"""Config = model + mesh + data + optim + train + checkpoint + run + finetune: frozen dataclasses
loaded from a YAML preset plus ``section.key=value`` overrides, and validated completely before
anything compiles.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from model.config import ModelConfig
from sharding.mesh import MeshConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """A user mistake in configuration; ``str()`` starts with the offending key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped, for an ``error:`` line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class RunError(RuntimeError):
    """A failure that ends a run (not a configuration mistake): a full disk, a non-finite
    divergence, a lost peer process. The CLI prints it as one ``error:`` line and exits 1."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it becomes tokens.

    source: ``stdlib`` (the installed Python standard library's .py files, present on every
    machine), ``text:GLOB`` (local UTF-8 text files, prepared once into ArrayRecord by a
    tensorflow-datasets builder) or ``tfds:NAME[:SPLIT[:FIELD]]`` (a tfds catalog dataset read from
    ``data_dir``), or ``jsonl:GLOB[:FIELD]`` (one document per JSON line, its FIELD, default
    ``text``). tokenizer: ``byte``, ``sentencepiece:PATH.model``, ``hf:PATH`` (a Hugging Face
    tokenizer.json or its directory) or ``run:RUN_DIR`` (the tokenizer saved in a run, e.g. an import).
    """

    source: str = "stdlib"
    tokenizer: str = "byte"
    data_dir: str = ""  # tensorflow-datasets data_dir for tfds: sources (e.g. gs://bucket/tfds)
    cache_dir: str = ""  # where text: sources are prepared; "" = ~/.cache/meshlm/tfds
    eval_fraction: float = 0.05  # documents held out for evaluation (stdlib and text: sources)
    prefetch: int = 2  # batches prepared ahead by a background thread (0: none)
    shuffle_tokens: int = 1 << 20  # chunks are shuffled within windows of about this many tokens
    streams: int = 8  # independent input streams; any process count dividing it sees the same batches


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``; global-norm clipping."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    decay_steps: int = 0  # 0: decay over train.steps
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: global batch (rows), sequence length, microbatches for gradient accumulation."""

    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 128
    microbatches: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4  # 0: one full pass over the held-out split
    steps_in_flight: int = 4  # bounded dispatch-ahead (the emulated CPU mesh deadlocks without it)
    max_skipped_steps: int = 10  # non-finite steps skipped in a row before the run stops (0: none)
    sample_tokens: int = 200
    sample_prompt: str = "def "


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``run.dir/checkpoints``: every N steps (0: only at the end), keep K."""

    every: int = 200
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where the run lives and how the process starts."""

    dir: str = "runs/default"
    distributed: bool = False  # jax.distributed.initialize() (one process per host on TPU pods)
    coordinator: str = ""  # host:port of process 0; "" = auto-detect (TPU VMs, SLURM, ...)
    num_processes: int = 0  # with coordinator: how many processes join
    process_id: int = -1  # with coordinator: this process's index
    init_timeout: int = 120  # seconds to wait for every process to join the coordinator
    heartbeat_timeout: int = 100  # seconds without a heartbeat before a process counts as dead
    cpu_devices: int = 8  # CPU devices to emulate per process when JAX runs on the host CPU
    peak_flops: float = 0.0  # FLOP/s of the whole job for MFU; 0: measure a matmul peak at start-up
    tensorboard: bool = True
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning from a meshlm run directory ``base`` ("" = pre-training): its model, tokenizer and
    checkpoint ``base_step`` (0: its latest). ``method``: ``lora`` trains only adapters of rank
    ``lora_rank`` (update scaled by ``lora_alpha / lora_rank``, input dropout ``lora_dropout``) on
    the comma-separated ``lora_targets`` among q,k,v,o,gate,up,down (``lora_experts``: the MoE
    experts' gate,up,down too); ``full`` trains every weight with a fresh optimizer, except the MoE
    routers with ``freeze_router``."""

    base: str = ""
    base_step: int = 0
    method: Literal["lora", "full"] = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q,k,v,o,gate,up,down"
    lora_experts: bool = False
    freeze_router: bool = False

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def problems(self, model: ModelConfig) -> list[tuple[str, str]]:
        """(key, message) for every inconsistency of the section, for the base ``model``."""
        from model.lora import TARGETS, LoRASpec, unmatched_targets

        out = []
        if self.base_step < 0:
            out.append(("base_step", f"must be >= 0 (0: the latest), got {self.base_step}"))
        if self.lora_rank < 1:
            out.append(("lora_rank", f"must be >= 1, got {self.lora_rank}"))
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            out.append(("lora_alpha", f"must be a positive number, got {self.lora_alpha}"))
        if not 0 <= self.lora_dropout < 1:
            out.append(("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}"))
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
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


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
        value = yaml.safe_load(raw) if raw.strip() else ""
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
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
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


def load_config(path: str | Path | None, overrides: list[str]) -> Config:
    """Config from a YAML preset (default: configs/default.yaml) plus overrides."""
    return build_config(load_yaml(path or DEFAULT_PRESET), overrides)


def tokenizer_vocab_size(data: DataConfig) -> int:
    from data.tokenizer import vocab_size_of

    try:
        return vocab_size_of(data.tokenizer)
    except ValueError as e:
        raise ConfigError("data.tokenizer", str(e)) from None


def validate_run(run: RunConfig) -> None:
    """Checks of the run section that must hold before devices are set up (no JAX needed)."""
    if run.coordinator and not 0 <= run.process_id < run.num_processes:
        raise ConfigError("run.process_id", f"must be in [0, run.num_processes="
                          f"{run.num_processes}) with run.coordinator, got {run.process_id}")
    for key in ("init_timeout", "heartbeat_timeout"):
        if getattr(run, key) < 1:
            raise ConfigError(f"run.{key}", f"must be >= 1 second, got {getattr(run, key)}")
    if run.cpu_devices < 1:
        raise ConfigError("run.cpu_devices", f"must be >= 1, got {run.cpu_devices}")
    if not run.dir:
        raise ConfigError("run.dir", "must not be empty")
    if "://" in run.dir:
        raise ConfigError("run.dir", f"{run.dir!r}: only local or mounted paths are supported "
                          "(put the run on a shared filesystem mounted on every host)")


def jax_process_count() -> int:
    import jax

    return jax.process_count()


def validate(cfg: Config, num_devices: int) -> None:
    """Every cross-field check; raises ConfigError naming the first bad key."""
    for key, message in cfg.model.problems():
        raise ConfigError(f"model.{key}", message)
    try:
        sizes = cfg.mesh.sizes(num_devices)
    except ValueError as e:
        key, _, message = str(e).partition(": ")
        raise ConfigError(key, message) from None
    m, t, o = cfg.model, cfg.train, cfg.optim
    if m.num_heads % sizes["tensor"]:
        raise ConfigError("model.num_heads", f"num_heads={m.num_heads} is not divisible by the "
                          f"tensor axis ({sizes['tensor']})")
    if m.num_experts % sizes["expert"]:
        raise ConfigError("model.num_experts", f"num_experts={m.num_experts} is not divisible by the "
                          f"expert axis ({sizes['expert']})")
    for key in ("steps", "batch_size", "seq_len", "microbatches", "log_every", "steps_in_flight"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    for key in ("eval_every", "eval_batches", "sample_tokens", "max_skipped_steps"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    if t.seq_len > m.max_seq_len:
        raise ConfigError("train.seq_len", f"seq_len={t.seq_len} is larger than the model's "
                          f"max_seq_len={m.max_seq_len}")
    dp = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if t.batch_size % dp:
        raise ConfigError("train.batch_size", f"global batch {t.batch_size} is not divisible by the "
                          f"data-parallel size {dp} (data*fsdp*expert)")
    if t.batch_size % t.microbatches or (t.batch_size // t.microbatches) % dp:
        raise ConfigError("train.microbatches", f"batch_size={t.batch_size} must split into "
                          f"{t.microbatches} microbatches that are each divisible by the "
                          f"data-parallel size {dp}")
    vocab = tokenizer_vocab_size(cfg.data)
    if vocab > m.vocab_size:
        raise ConfigError("model.vocab_size", f"vocab_size={m.vocab_size} is smaller than the "
                          f"{cfg.data.tokenizer} tokenizer's {vocab} ids")
    source = cfg.data.source
    if not (source == "stdlib" or source.startswith(("text:", "jsonl:", "tfds:"))):
        raise ConfigError("data.source", f"expected stdlib, text:GLOB, jsonl:GLOB[:FIELD] or "
                          f"tfds:NAME, got {source!r}")
    if not 0 < cfg.data.eval_fraction < 1:
        raise ConfigError("data.eval_fraction", f"must be in (0, 1), got {cfg.data.eval_fraction}")
    if cfg.data.shuffle_tokens < 0:
        raise ConfigError("data.shuffle_tokens", f"must be >= 0, got {cfg.data.shuffle_tokens}")
    if cfg.data.streams < 1 or t.batch_size % cfg.data.streams:
        raise ConfigError("data.streams", f"train.batch_size={t.batch_size} must be a multiple of "
                          f"data.streams={cfg.data.streams}")
    if cfg.data.streams % jax_process_count():
        raise ConfigError("data.streams", f"data.streams={cfg.data.streams} is not divisible by "
                          f"the {jax_process_count()} processes")
    if cfg.data.prefetch < 0:
        raise ConfigError("data.prefetch", f"must be >= 0, got {cfg.data.prefetch}")
    if t.batch_size % jax_process_count():
        raise ConfigError("train.batch_size", f"global batch {t.batch_size} is not divisible by the "
                          f"{jax_process_count()} processes")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ConfigError("optim.lr", f"must be a positive number, got {o.lr}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    if o.warmup_steps < 0 or o.decay_steps < 0:
        raise ConfigError("optim.warmup_steps", "warmup_steps and decay_steps must be >= 0")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
        raise ConfigError("optim.b1", f"b1 and b2 must be in [0, 1), got {o.b1}, {o.b2}")
    if o.weight_decay < 0 or o.clip_norm < 0 or o.eps <= 0:
        raise ConfigError("optim.weight_decay", "weight_decay and clip_norm must be >= 0, eps > 0")
    if cfg.checkpoint.every < 0:
        raise ConfigError("checkpoint.every", f"must be >= 0, got {cfg.checkpoint.every}")
    if cfg.checkpoint.keep < 1:
        raise ConfigError("checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}")
    for key, message in cfg.finetune.problems(cfg.model) if cfg.finetune.base else ():
        raise ConfigError(f"finetune.{key}", message)
    validate_run(cfg.run)


def config_from_dict(raw: dict[str, dict[str, Any]]) -> Config:
    """The inverse of ``Config.to_dict`` (e.g. a run directory's config.yaml)."""
    return build_config(raw, [])


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
