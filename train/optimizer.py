"""The optax chain: global-norm clipping, then AdamW under linear warmup + cosine decay, with no
weight decay on norm scales and biases.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from train.config import OptimConfig

NO_DECAY_NAMES = ("scale", "bias")


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """0 -> lr over ``warmup_steps``, then cosine to ``min_lr_ratio * lr`` at ``decay_steps``."""
    decay_steps = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps, end_value=cfg.lr * cfg.min_lr_ratio)


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything but norm scales and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(n in NO_DECAY_NAMES for n in _path_names(path)), params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                 optax.Schedule]:
    schedule = lr_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule
