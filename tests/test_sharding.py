"""Sharded execution equals single-device execution; parameter layouts are pinned by a golden file."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from data.pipeline import empty_batch
from model.transformer import Transformer
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules, logical_to_spec, tree_shardings, tree_specs
from tests import reference
from tests.helpers import SMALL, loss_and_grads, random_batch, tiny_config
from train.config import CONFIG_DIR, build_config, load_yaml
from train.optimizer import make_optimizer
from train.program import Program
from train.state import abstract_state, init_state

TOL = 1e-5  # fp32 relative
GOLDEN = Path(__file__).parent / "golden" / "partition_specs_tiny_data2_fsdp2_tensor2.json"


@pytest.mark.parametrize("mesh_axes", [
    {"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 2},
])
def test_sharded_loss_and_grads_equal_single_device(eight_devices, mesh_axes):
    batch = random_batch(8, 16, SMALL.vocab_size)
    loss_1, grads_1 = loss_and_grads(SMALL, {"data": 1}, batch, devices=eight_devices[:1])
    loss_n, grads_n = loss_and_grads(SMALL, mesh_axes, batch)
    assert abs(loss_n - loss_1) <= TOL * abs(loss_1)
    for a, b in zip(jax.tree.leaves(grads_n), jax.tree.leaves(grads_1), strict=True):
        assert reference.relative_error(a, b) < TOL


def test_partition_specs_match_golden(eight_devices):
    cfg = build_config(load_yaml(CONFIG_DIR / "tiny.yaml"), [])
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    _, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))
    specs = tree_specs(params, mesh, default_rules())
    if os.environ.get("MESHLM_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(specs, indent=2, sort_keys=True) + "\n")
    assert specs == json.loads(GOLDEN.read_text())


def test_state_is_created_sharded(eight_devices):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = default_rules()
    tx, _ = make_optimizer(build_config({}, []).optim, 10)
    _, abstract = abstract_state(SMALL, tx)
    shardings = tree_shardings(abstract, mesh, rules)
    state = init_state(SMALL, tx, 0, shardings)
    w = state.params["blocks"]["mlp"]["w_up_df"][...]  # [layers, embed, mlp] -> (None, fsdp, tensor)
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert w.addressable_shards[0].data.shape == (SMALL.num_layers, 16, 24)
    mu = state.opt_state[1][0].mu["blocks"]["mlp"]["w_up_df"][...]  # Adam moment: same layout
    assert mu.sharding == w.sharding


def test_rules_drop_axes_that_do_not_divide(eight_devices):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = default_rules()
    assert logical_to_spec(("vocab", "embed"), (6, 8), mesh, rules) == \
        jax.sharding.PartitionSpec("tensor", "fsdp")
    assert logical_to_spec(("vocab", "embed"), (5, 8), mesh, rules) == \
        jax.sharding.PartitionSpec(None, "fsdp")
    assert logical_to_spec(("batch", "length"), (4, 3), mesh, rules) == \
        jax.sharding.PartitionSpec(("data", "fsdp"))
    assert logical_to_spec(("batch", "length"), (2, 3), mesh, rules) == \
        jax.sharding.PartitionSpec("data")


def test_mesh_fill_axis(eight_devices):
    assert MeshConfig(data=-1, tensor=2).sizes(8) == {"data": 4, "fsdp": 1, "context": 1, "tensor": 2,
                                                        "expert": 1}
    with pytest.raises(ValueError, match="product"):
        MeshConfig(data=3).sizes(8)
    assert np.prod(list(make_mesh(MeshConfig(data=1, fsdp=-1, tensor=4)).shape.values())) == 8


def _three_steps(cfg, mesh):
    """(losses, params) after three train steps of ``cfg`` on ``mesh``, from random batches."""
    program = Program(cfg, mesh=mesh)
    state, losses, t = program.init(), [], cfg.train
    for step in range(3):
        rows = random_batch(t.batch_size, t.seq_len, cfg.model.vocab_size, seed=step)
        batch = empty_batch(t.batch_size, t.seq_len) | rows
        state, metrics = program.train_step(state, program.global_batch(batch))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


def test_two_emulated_slices_train_like_one_mesh_of_eight(eight_devices, tmp_path):
    """Two slices of 4 CPU devices (emulated in one process: consecutive device ids; JAX's hybrid
    mesh needs ``slice_index`` or one process per slice) train the same as one mesh of 8."""
    cfg = tiny_config(tmp_path, "mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2")
    mesh = make_mesh(cfg.mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2, "expert": 1}
    assert [sorted(d.id for d in mesh.devices[s].flat) for s in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    across_fsdp = make_mesh(MeshConfig(data=2, fsdp=2, dcn_fsdp=2))  # fsdp = slice x ici position
    assert [d.id for d in across_fsdp.devices[0, :, 0, 0, 0]] == [0, 1, 4, 5]
    sliced = _three_steps(cfg, mesh)
    one = _three_steps(cfg, make_mesh(MeshConfig(data=8)))
    assert np.allclose(sliced[0], one[0], rtol=1e-5, atol=0), (sliced[0], one[0])
    for a, b in zip(jax.tree.leaves(sliced[1]), jax.tree.leaves(one[1]), strict=True):
        assert reference.relative_error(a, b) < 1e-4


def test_mesh_dcn_sizes_are_checked(eight_devices):
    assert MeshConfig(dcn_data=2, tensor=2).ici_sizes(8)["data"] == 2
    assert MeshConfig(dcn_data=2, tensor=2).sizes(8)["data"] == 4
    with pytest.raises(ValueError, match="mesh.dcn_fsdp: must be >= 1"):
        MeshConfig(dcn_fsdp=0).sizes(8)
    with pytest.raises(ValueError, match="mesh.dcn_data: the dcn_\\* sizes multiply to 3 slices"):
        MeshConfig(dcn_data=3).sizes(8)
    with pytest.raises(ValueError, match="mesh: product .* is 8, but there are 4 devices of each "
                                         "of 2 slices"):
        MeshConfig(dcn_data=2, data=8).sizes(8)
