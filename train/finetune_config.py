"""The config of a run from a command line (``CONFIG [section.key=value ...]``), resolved against
``finetune.base`` when one is set: a fine-tune's model section and tokenizer come from its base run,
and its base checkpoint is pinned."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from train.config import (
    CONFIG_DIR,
    DEFAULT_PRESET,
    Config,
    build_config,
    load_yaml,
    parse_override,
    preset_path,
)
from train.run_dir import RunDir

DEFAULT_FINETUNE_PRESET = CONFIG_DIR / "finetune_lora.yaml"
# Model keys a fine-tune may set differently from its base: they change how it runs, not its weights.
RUNTIME_MODEL_KEYS = ("dtype", "remat", "scan_layers", "attention_impl", "attention_block",
                      "loss_chunk", "moe_impl", "moe_matmul", "capacity_factor", "aux_loss_coef",
                      "z_loss_coef")


def load_run_config(path: str | Path | None, overrides: list[str], *,
                    finetune: bool = False) -> Config:
    """Config from a preset and overrides, resolved against ``finetune.base`` when it is set;
    ``finetune=True`` requires it. Without a preset, a fine-tune starts from
    configs/finetune_lora.yaml (whose model section is empty), else configs/default.yaml."""
    finetuning = finetune or any(o.startswith("finetune.base=") for o in overrides)
    raw = load_yaml(preset_path(path, DEFAULT_FINETUNE_PRESET if finetuning else DEFAULT_PRESET))
    cfg = build_config(raw, overrides)
    if not cfg.finetune.base:
        if finetune:
            raise ConfigError("finetune.base", "required: the run directory to fine-tune "
                              "(finetune.base=RUN_DIR)")
        return cfg
    model_keys = dict(raw.get("model") or {})
    for text in overrides:
        section, key, value = parse_override(text)
        if section == "model":
            model_keys[key] = value
    return resolve_finetune(cfg, model_keys)


def resolve_finetune(cfg: Config, model_keys: dict[str, Any]) -> Config:
    """``cfg`` with its model, tokenizer and base checkpoint taken from ``finetune.base``.

    ``model_keys`` are the model settings the preset and overrides gave; any that differs from the
    base run's (other than RUNTIME_MODEL_KEYS) is a ConfigError, as is a missing or unusable base."""
    ft = cfg.finetune
    base_dir = RunDir(Path(ft.base).expanduser().resolve())
    try:
        base = base_dir.read_config()
        tokenizer = base_dir.tokenizer_spec()
    except ValueError as e:
        raise ConfigError("finetune.base", str(e)) from None
    if base.finetune.base and base.finetune.method == "lora":
        raise ConfigError("finetune.base", f"{base_dir.path} holds LoRA adapters, not a model: merge "
                          "them first (python -m train.finetune merge ADAPTER_RUN OUT_RUN)")
    steps = base_dir.committed_steps()
    if not steps:
        raise ConfigError("finetune.base", f"{base_dir.path} has no complete checkpoint")
    step = ft.base_step or pinned_base_step(cfg, base_dir.path) or max(steps)
    if step not in steps:
        raise ConfigError("finetune.base_step", f"{base_dir.path} has no checkpoint {step} (it has "
                          f"{', '.join(map(str, steps))})")
    given = build_config({"model": dict(model_keys)}, []).model
    runtime = {}
    for key in model_keys:
        ours, theirs = getattr(given, key), getattr(base.model, key)
        if key in RUNTIME_MODEL_KEYS:
            runtime[key] = ours
        elif ours != theirs:
            raise ConfigError(f"model.{key}", f"the model comes from the base run {base_dir.path} "
                              f"({key}={theirs}); remove this setting (got {ours})")
    return dataclasses.replace(
        cfg, model=dataclasses.replace(base.model, **runtime),
        data=dataclasses.replace(cfg.data, tokenizer=tokenizer),
        finetune=dataclasses.replace(ft, base=str(base_dir.path), base_step=step))


def pinned_base_step(cfg: Config, base_dir: Path) -> int:
    """The base step an existing fine-tune in ``run.dir`` started from (so resuming it keeps its
    base when the base run has moved on), or 0."""
    try:
        previous = RunDir(cfg.run.dir).read_config().finetune
    except ValueError:
        return 0
    return previous.base_step if previous.base == str(base_dir) else 0
