"""Every cross-field check of a Config, before anything compiles: each raises a ConfigError naming
the first bad key. How the mesh divides the model and the batch is asked of ``sharding/``'s rules
table, never computed from mesh axis names here."""

from __future__ import annotations

import math
from typing import Any

import jax

from core.errors import ConfigError
from data.chat_data import CHAT, CHAT_CACHE_ERROR
from data.mixture import parse_mix
from data.tokenizer import vocab_size_of
from model.config import ModelConfig
from model.splash import splash_problems
from sharding.mesh import check_slices
from sharding.rules import default_rules, mesh_axes_of, shards_of
from train.config import (
    FIXED_BECAUSE,
    RESUMABLE,
    Config,
    DataConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from train.store import check_run_url

SOURCE_KINDS = ("text:", "jsonl:", "tfds:", "parquet:", "hf:", "hf-stream:", "pref:", "chat:")
WANDB_FORBIDDEN = "/\\#?%:"  # W&B refuses project names with these (wandb/sdk/wandb_settings.py)


def validate(cfg: Config, num_devices: int) -> None:
    """Every cross-field check of ``cfg`` for a job on ``num_devices`` devices."""
    for key, message in cfg.model.problems():
        raise ConfigError(f"model.{key}", message)
    try:
        sizes = cfg.mesh.sizes(num_devices)
        if cfg.mesh.slices > 1 and jax.device_count() == num_devices:  # a job on these devices
            check_slices(cfg.mesh, jax.devices())
    except ValueError as e:
        key, _, message = str(e).partition(": ")
        raise ConfigError(key, message) from None
    check_sharding(cfg, sizes)
    check_train(cfg.train, cfg.model.max_seq_len)
    check_batch_split(cfg.train, sizes)
    check_length_split(cfg.train, cfg.model, sizes)
    check_data(cfg.data, cfg.train, cfg.model.vocab_size)
    check_optim(cfg.optim)
    if cfg.checkpoint.every < 0:
        raise ConfigError("checkpoint.every", f"must be >= 0, got {cfg.checkpoint.every}")
    if cfg.checkpoint.keep < 1:
        raise ConfigError("checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}")
    for key, message in cfg.finetune.problems(cfg.model) if cfg.finetune.base else ():
        raise ConfigError(f"finetune.{key}", message)
    check_objective(cfg)
    validate_run(cfg.run)


def _axes(name: str) -> str:
    return "*".join(mesh_axes_of(name, default_rules()))


def check_sharding(cfg: Config, sizes: dict[str, int]) -> None:
    """The model's heads and experts split evenly over the mesh axes that shard them."""
    rules, m = default_rules(), cfg.model
    if m.num_heads % shards_of("heads", sizes, rules):
        raise ConfigError("model.num_heads", f"num_heads={m.num_heads} is not divisible by the "
                          f"{_axes('heads')} axis ({shards_of('heads', sizes, rules)})")
    if m.num_experts % shards_of("experts", sizes, rules):
        raise ConfigError("model.num_experts", f"num_experts={m.num_experts} is not divisible by the "
                          f"{_axes('experts')} axis ({shards_of('experts', sizes, rules)})")


def check_train(t: TrainConfig, max_seq_len: int) -> None:
    for key in ("steps", "batch_size", "seq_len", "microbatches", "log_every", "steps_in_flight"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    for key in ("eval_every", "eval_batches", "sample_tokens", "max_skipped_steps"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    if t.seq_len > max_seq_len:
        raise ConfigError("train.seq_len", f"seq_len={t.seq_len} is larger than the model's "
                          f"max_seq_len={max_seq_len}")
    check_profile(t)


def check_profile(t: TrainConfig) -> None:
    """``train.profile`` names steps of the run: 1 <= START <= END <= train.steps."""
    try:
        steps = t.profile_steps()
    except ValueError as e:
        raise ConfigError("train.profile", str(e)) from None
    if steps is not None and not 1 <= steps[0] <= steps[1] <= t.steps:
        raise ConfigError("train.profile", f"{t.profile!r} must name steps START <= END within "
                          f"1..train.steps={t.steps}")


def check_batch_split(t: TrainConfig, sizes: dict[str, int]) -> None:
    """The global batch (and each microbatch) divides into the data-parallel shards."""
    dp = shards_of("batch", sizes, default_rules())
    if t.batch_size % dp:
        raise ConfigError("train.batch_size", f"global batch {t.batch_size} is not divisible by the "
                          f"data-parallel size {dp} ({_axes('batch')})")
    if t.batch_size % t.microbatches or (t.batch_size // t.microbatches) % dp:
        raise ConfigError("train.microbatches", f"batch_size={t.batch_size} must split into "
                          f"{t.microbatches} microbatches that are each divisible by the "
                          f"data-parallel size {dp}")


def check_length_split(t: TrainConfig, m: ModelConfig, sizes: dict[str, int]) -> None:
    """The sequence divides into the context-parallel shards (the mesh axes that split ``length``),
    and an explicit splash kernel can tile each shard."""
    cp = shards_of("length", sizes, default_rules())
    if t.seq_len % cp:
        raise ConfigError("train.seq_len", f"seq_len={t.seq_len} is not divisible by the "
                          f"context-parallel size {cp} ({_axes('length')})")
    problems = splash_problems(t.seq_len // cp) if m.attention_impl == "splash" else []
    if problems:
        split = f" split {cp} ways" if cp > 1 else ""
        raise ConfigError("model.attention_impl", f"splash cannot take train.seq_len={t.seq_len}"
                          f"{split}: {problems[0]}; use attention_impl=auto or another length")


def check_data(d: DataConfig, t: TrainConfig, vocab_size: int) -> None:
    """The tokenizer fits the model; the source and its streams split over the processes."""
    try:
        vocab = vocab_size_of(d.tokenizer)
    except ValueError as e:
        raise ConfigError("data.tokenizer", str(e)) from None
    if vocab > vocab_size:
        raise ConfigError("model.vocab_size", f"vocab_size={vocab_size} is smaller than the "
                          f"{d.tokenizer} tokenizer's {vocab} ids")
    check_sources(d)
    if not 0 < d.eval_fraction < 1:
        raise ConfigError("data.eval_fraction", f"must be in (0, 1), got {d.eval_fraction}")
    if d.shuffle_tokens < 0:
        raise ConfigError("data.shuffle_tokens", f"must be >= 0, got {d.shuffle_tokens}")
    if d.streams < 1 or t.batch_size % d.streams:
        raise ConfigError("data.streams", f"train.batch_size={t.batch_size} must be a multiple of "
                          f"data.streams={d.streams}")
    processes = jax.process_count()
    if d.streams % processes:
        raise ConfigError("data.streams", f"data.streams={d.streams} is not divisible by the "
                          f"{processes} processes")
    if d.prefetch < 0:
        raise ConfigError("data.prefetch", f"must be >= 0, got {d.prefetch}")
    if t.batch_size % processes:
        raise ConfigError("train.batch_size", f"global batch {t.batch_size} is not divisible by the "
                          f"{processes} processes")


def check_sources(d: DataConfig) -> None:
    """``data.source``, or every source of ``data.mix``, is of a known kind; the mix parses."""
    try:
        specs = [spec for spec, _ in parse_mix(d.mix)] if d.mix else [d.source]
    except ValueError as e:
        raise ConfigError("data.mix", f"expected SPEC:WEIGHT,SPEC:WEIGHT,...: {e}") from None
    for spec in specs:
        if not (spec == "stdlib" or spec.startswith(SOURCE_KINDS)):
            raise ConfigError("data.mix" if d.mix else "data.source",
                              f"expected stdlib, text:GLOB, jsonl:GLOB[:FIELD], tfds:NAME, "
                              f"parquet:GLOB, hf:PATH, hf-stream:PATH, chat:GLOB or pref:GLOB, got {spec!r}")
    if d.token_cache and any(spec.startswith(CHAT) for spec in specs):
        raise ConfigError("data.token_cache", CHAT_CACHE_ERROR)


def check_objective(cfg: Config) -> None:
    """A preference objective reads one ``pref:`` source (whole pairs in every microbatch and on
    every process), and a ``pref:`` source is read only by one."""
    d, t, objective = cfg.data, cfg.train, cfg.finetune.objective
    preference = objective != "sft"
    if preference and not cfg.finetune.base:
        raise ConfigError("finetune.objective", f"{objective} fine-tunes a run: set finetune.base")
    specs = [spec for spec, _ in parse_mix(d.mix)] if d.mix else [d.source]  # parsed: check_sources
    if preference and (d.mix or not d.source.startswith("pref:")):
        raise ConfigError("data.source", f"finetune.objective={objective} reads preference pairs: "
                          f"data.source=pref:GLOB (and no data.mix), got {d.mix or d.source!r}")
    if not preference and any(spec.startswith("pref:") for spec in specs):
        raise ConfigError("data.source", "pref: sources hold preference pairs: set "
                          "finetune.objective=dpo or simpo")
    if preference and d.token_cache:
        raise ConfigError("data.token_cache", "pref: sources are tokenized when opened; set "
                          "data.token_cache=false")
    pairs = 2 * t.microbatches * jax.process_count()
    if preference and t.batch_size % pairs:
        raise ConfigError("train.batch_size", f"batch_size={t.batch_size} rows must split into whole "
                          f"pairs (2 rows) per microbatch and process: a multiple of {pairs}")


def check_optim(o: OptimConfig) -> None:
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


def validate_run(run: RunConfig) -> None:
    """Checks of the run section that must hold before devices are set up (no JAX device needed)."""
    if run.coordinator and not 0 <= run.process_id < run.num_processes:
        raise ConfigError("run.process_id", f"must be in [0, run.num_processes="
                          f"{run.num_processes}) with run.coordinator, got {run.process_id}")
    for key in ("init_timeout", "heartbeat_timeout"):
        if getattr(run, key) < 1:
            raise ConfigError(f"run.{key}", f"must be >= 1 second, got {getattr(run, key)}")
    if not (run.step_timeout >= 0 or run.step_timeout == -1):  # NaN too
        raise ConfigError("run.step_timeout", "must be seconds > 0, 0 (automatic: 10x the median "
                          f"step after warm-up) or -1 (never), got {run.step_timeout}")
    if run.cpu_devices < 1:
        raise ConfigError("run.cpu_devices", f"must be >= 1, got {run.cpu_devices}")
    if not run.dir:
        raise ConfigError("run.dir", "must not be empty")
    if len(run.wandb) > 128 or set(run.wandb) & set(WANDB_FORBIDDEN):
        raise ConfigError("run.wandb", f"{run.wandb!r} is not a Weights & Biases project name (at "
                          f"most 128 characters, none of {WANDB_FORBIDDEN})")
    if problem := check_run_url(run.dir):
        raise ConfigError("run.dir", problem)
    if not run.lock_ttl > 0:  # NaN too
        raise ConfigError("run.lock_ttl", f"must be seconds > 0, got {run.lock_ttl}")


def _resume_view(cfg: Config) -> dict[str, Any]:
    """``section.key`` -> value, with ``optim.decay_steps`` as the schedule's actual length."""
    view = {f"{section}.{key}": value for section, values in cfg.to_dict().items()
            for key, value in values.items()}
    view["optim.decay_steps"] = cfg.optim.decay_steps or cfg.train.steps
    return view


def _shown(value: Any) -> str:
    return '""' if value == "" else str(value)


def check_resume(previous: Config, cfg: Config, run_dir: str) -> None:
    """ConfigError unless ``cfg`` changes only keys a resume of a run started with ``previous`` may
    change (RESUMABLE in train/config.py): it names the first refused key with its old and new
    value, and the other refused keys on the same line."""
    old, new = _resume_view(previous), _resume_view(cfg)
    refused = [key for key in old if old[key] != new[key]
               and key.partition(".")[2] not in RESUMABLE[key.partition(".")[0]]]
    if not refused:
        return
    key = refused[0]
    also = f" (also changed: {', '.join(refused[1:])})" if refused[1:] else ""
    if key == "optim.decay_steps" and not cfg.optim.decay_steps:  # derived from a new train.steps
        raise ConfigError("train.steps", f"the run in {run_dir} started with train.steps="
                          f"{previous.train.steps} and a learning-rate schedule of {old[key]} steps; "
                          f"train.steps={cfg.train.steps} would re-stretch it mid-run. To train on "
                          f"with the same schedule, also set optim.decay_steps={old[key]}{also}")
    raise ConfigError(key, f"the run in {run_dir} started with {key}={_shown(old[key])}; a resume "
                      f"cannot change it to {key}={_shown(new[key])} "
                      f"({FIXED_BECAUSE[key.partition('.')[0]]}). Keep {key}={_shown(old[key])} or "
                      f"choose another run.dir{also}")
