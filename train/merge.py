"""Merging a LoRA fine-tune: a new plain run directory whose checkpoint holds the base weights with
the adapters added in, for evaluation, export and further fine-tuning."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from core.errors import first_line
from train.checkpoint import Checkpointer
from train.config import FinetuneConfig
from train.program import Program
from train.run_dir import RunDir
from train.state import TrainState


def merge_run(adapter_run: str | Path, out_run: str | Path) -> dict[str, Any]:
    """Writes ``out_run``: ``adapter_run``'s config (finetune section cleared; its model section is the
    base's, so evaluation keeps the base's window, ``model.max_seq_len``, whatever ``train.seq_len``
    the fine-tune trained at), tokenizer, and its latest checkpoint with the adapters merged into
    the base weights; returns a summary.
    ValueError for an unusable adapter run or an existing ``out_run``."""
    source, target = RunDir(Path(adapter_run).resolve()), RunDir(Path(out_run).resolve())
    cfg = source.read_config()
    if not (cfg.finetune.base and cfg.finetune.method == "lora"):
        raise ValueError(f"{source.path} is not a LoRA fine-tune run (finetune.method=lora)")
    steps = source.committed_steps()
    if not steps:
        raise ValueError(f"{source.path} has no complete checkpoint")
    _check_empty(target)
    step = max(steps)
    trainee = Program(dataclasses.replace(cfg, mesh=cfg.mesh.fitting(jax.device_count()))).trainee
    checkpointer = Checkpointer(source.path, cfg.checkpoint, read_only=True)
    try:
        adapters = checkpointer.restore_params(step, trainee.abstract.params, trainee.shardings.params)
        trainee.check_base(checkpointer.restore_meta(step))
    except Exception as e:  # orbax raises many types for damaged files
        raise ValueError(f"cannot restore checkpoint {step} of {source.path}: {first_line(e)}") from None
    finally:
        checkpointer.close()
    trainee.frozen = trainee.split_base(trainee.load_base(trainee.base_step))[1]
    _, params = trainee.plain_model(TrainState(None, adapters, None))
    out_cfg = dataclasses.replace(cfg, finetune=FinetuneConfig(),
                                  run=dataclasses.replace(cfg.run, dir=str(target.path)))
    with target.locked():  # one writer, as for training
        _check_empty(target)  # again: another writer may have begun meanwhile
        if jax.process_index() == 0:
            target.write_config(out_cfg)
            source.copy_tokenizer_to(target)  # as the adapter run saved it
        saved = Checkpointer(target.path, dataclasses.replace(cfg.checkpoint, async_save=False))
        meta = {"step": step, "merged_from": str(source.path), **trainee.checkpoint_meta()}
        saved.save(step, TrainState(jnp.asarray(step, jnp.int32), params, None), meta, {})
        saved.close()
    return {"out_run": str(target.path), "step": step, "base_run": cfg.finetune.base,
            "base_step": cfg.finetune.base_step}


def _check_empty(target: RunDir) -> None:
    """ValueError unless ``target`` is new or empty (a lock file left by a failed merge aside)."""
    if target.path.exists() and any(p != target.lock_file for p in target.path.iterdir()):
        raise ValueError(f"{target.path} exists and is not empty: choose a new directory")
