"""The optimizer: warmup + cosine schedule and the weight-decay mask."""

import jax
import numpy as np
from flax import nnx

from model.transformer import Transformer
from tests.helpers import SMALL
from train.config import OptimConfig
from train.optimizer import decay_mask, lr_schedule


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    schedule = lr_schedule(cfg, total_steps=110)
    assert float(schedule(0)) == 0.0
    assert np.isclose(float(schedule(5)), 5e-4)
    assert np.isclose(float(schedule(10)), 1e-3)
    assert np.isclose(float(schedule(60)), 1e-4 + 0.5 * (1e-3 - 1e-4))  # cosine midpoint
    assert np.isclose(float(schedule(110)), 1e-4) and np.isclose(float(schedule(500)), 1e-4)


def test_no_weight_decay_on_norm_scales():
    _, params = nnx.split(nnx.eval_shape(lambda: Transformer(SMALL, nnx.Rngs(0))))
    mask = nnx.to_flat_state(decay_mask(params))
    decayed = {"/".join(map(str, path)) for path, v in mask if v.get_value()}
    skipped = {"/".join(map(str, path)) for path, v in mask if not v.get_value()}
    assert skipped == {"blocks/attn_norm/scale", "blocks/mlp_norm/scale", "final_norm/scale"}
    assert "blocks/mlp/w_up_df" in decayed and "embed/table_vd" in decayed
    assert len(jax.tree.leaves(params)) == len(decayed) + len(skipped)
