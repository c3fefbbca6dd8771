"""Training behaviour: accumulation equals full batch, loss falls, exact resume, restore on a new mesh."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.pipeline import eval_batches
from data.sources import open_source
from data.tokenizer import make_tokenizer
from sharding.mesh import MeshConfig, make_mesh
from tests import reference
from tests.helpers import SMALL, loss_and_grads, losses_of, random_batch, small_text, tiny_config
from train.checkpoint import Checkpointer
from train.loop import train
from train.metrics import MetricsWriter, StepLog
from train.program import Program
from train.run_dir import RunDir

TOL = 1e-5


def test_gradient_accumulation_equals_full_batch(eight_devices):
    batch = random_batch(16, 16, SMALL.vocab_size, seed=1)
    mesh_axes = {"data": 2, "fsdp": 2, "tensor": 2}
    loss_full, grads_full = loss_and_grads(SMALL, mesh_axes, batch, microbatches=1)
    loss_micro, grads_micro = loss_and_grads(SMALL, mesh_axes, batch, microbatches=4)
    assert abs(loss_micro - loss_full) <= TOL * abs(loss_full)
    for a, b in zip(jax.tree.leaves(grads_micro), jax.tree.leaves(grads_full), strict=True):
        assert reference.relative_error(a, b) < TOL


def test_loss_falls_within_100_steps(eight_devices, tmp_path):
    text = small_text(tmp_path / "text")
    cfg = tiny_config(tmp_path / "run", f"data.source=text:{text}", "train.steps=100",
                      "train.log_every=1", "checkpoint.every=25", "checkpoint.keep=2")
    summary = train(cfg)
    assert Checkpointer(tmp_path / "run", cfg.checkpoint).all_steps() == [75, 100]  # keep last 2
    losses = losses_of(tmp_path / "run")
    first, last = losses[1], np.mean([losses[s] for s in range(91, 101)])
    assert first > 5.0  # ~ln(vocab) at initialisation
    assert last < first - 3.0, (first, last)
    assert summary["eval_loss"] < 2.0


def _resume_cfg(run_dir, *extra):
    return tiny_config(run_dir, "train.log_every=1", "checkpoint.every=10", "optim.decay_steps=20",
                       "optim.warmup_steps=5", *extra)


def test_resume_is_exact_and_restores_onto_another_mesh(eight_devices, tmp_path):
    straight = tmp_path / "straight"
    train(_resume_cfg(straight, "train.steps=20"))
    interrupted = tmp_path / "interrupted"
    train(_resume_cfg(interrupted, "train.steps=10"))  # stops right after the step-10 checkpoint
    assert Checkpointer(interrupted, _resume_cfg(interrupted).checkpoint).all_steps() == [10]
    train(_resume_cfg(interrupted, "train.steps=20"))  # resumes from step 10
    a, b = losses_of(straight), losses_of(interrupted)
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]  # bitwise

    # The step-20 checkpoint written on data=8 restored onto data=2 x fsdp=2 x tensor=2.
    cfg = _resume_cfg(straight, "train.steps=20")
    eval_loss = {name: _eval_loss_after_restore(cfg, straight, axes)
                 for name, axes in {"same": {"data": 8},
                                    "other": {"data": 2, "fsdp": 2, "tensor": 2}}.items()}
    assert abs(eval_loss["other"] - eval_loss["same"]) <= TOL * eval_loss["same"]

    # A checkpoint missing a process's input position is refused with a clear message.
    data_dir = straight / "checkpoints" / "20" / "data"
    (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
    with pytest.raises(ValueError, match="lacks input positions"):
        _eval_loss_after_restore(cfg, straight, {"data": 8})


def _eval_loss_after_restore(cfg, run_dir, mesh_axes) -> float:
    program = Program(cfg, mesh=make_mesh(MeshConfig(**mesh_axes)))
    t = cfg.train
    docs = open_source(cfg.data.source, "eval", eval_fraction=cfg.data.eval_fraction)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    state, meta, data_state = checkpointer.restore(20, *program.trainee.checkpoint_abstract)
    checkpointer.close()
    assert meta == {"step": 20} and int(state.step) == 20 and data_state
    data = eval_batches(docs, make_tokenizer("byte"), seq_len=t.seq_len,
                        batch_size=t.batch_size, max_batches=2)
    assert program.global_batch(data[0])["inputs"].shape == (t.batch_size, t.seq_len)
    return program.evaluate(state.params, data)


def test_the_last_logged_interval_is_timed_by_completed_steps(tmp_path):
    # Each step's outputs are ready as soon as it is pushed and the host spends 20 ms per step (a
    # host-bound run): every interval must read the same rate, the last one included, although its
    # steps in flight are all fetched at once by the final drain.
    cfg = tiny_config(tmp_path, "train.steps=12", "train.log_every=4", "train.steps_in_flight=4",
                      "run.progress=false", "run.tensorboard=false")
    with MetricsWriter(RunDir(tmp_path), cfg) as writer:
        log = StepLog(cfg, writer, 0, 1.0, 0.0, lambda: None)
        for step in range(1, 13):
            time.sleep(0.02)
            log.push(step, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0),
                            "lr": jnp.float32(1e-3), "skipped": jnp.int32(0)})
        log.drain()
    records = [json.loads(x) for x in RunDir(tmp_path).metrics_file.read_text().splitlines()]
    rates = {r["step"]: r["tokens_per_s"] for r in records}
    assert sorted(rates) == [4, 8, 12]
    assert max(rates.values()) < 1.5 * min(rates.values()), rates
