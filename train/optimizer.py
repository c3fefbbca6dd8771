"""The optimizer: global-norm clipping, then AdamW's update direction (no weight decay on norm
scales and biases), and the learning-rate schedule (linear warmup + cosine decay) that
``train/step.py`` multiplies the direction by, evaluated at the state's own step.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from train.config import OptimConfig

NO_DECAY_NAMES = ("scale", "bias")


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate of the update taken from state step ``s`` (logged as step ``s + 1``): linear
    from 0 over ``warmup_steps`` logged steps, then cosine to ``min_lr_ratio * lr`` at logged step
    ``decay_steps``. Counting logged steps, the first update already moves the parameters
    (``lr / warmup_steps``), where a warm-up evaluated at 0 would spend it at rate 0."""
    decay_steps = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
    by_logged_step = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps, end_value=cfg.lr * cfg.min_lr_ratio)
    return lambda step: by_logged_step(step + 1)


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything but norm scales and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(n in NO_DECAY_NAMES for n in _path_names(path)), params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                 optax.Schedule]:
    """(AdamW's update direction, the learning-rate schedule). The direction is ``optax.adamw``
    without its last link, the learning-rate scaling: ``train_step`` applies ``-schedule(step)``
    itself, from the step it logs, so a skipped update (which keeps the optimizer state, the
    count of Adam's bias correction included) cannot shift the learning rate off the step."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.chain(
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask)))
    return optax.chain(*parts), lr_schedule(cfg, total_steps)
