"""Checkpoint throughput: save and restore MB/s of a ~100M-parameter training state (parameters and
AdamW moments, float32) through ``train/checkpoint.py``, to local disk and to an S3-compatible
server on localhost, and how much slower the training step runs while an asynchronous save of it is
in flight.

    python -m bench.checkpoint [--stores disk,s3] [--s3 URL] [--steps N] [--results DIR]
                               [section.key=value ...]

The S3 server is moto's, started here in a process of its own: a Python server on the same cores
as the trainer, so its MB/s is a floor, not what S3 gives (``--s3 s3://BUCKET/PREFIX`` measures an
existing bucket instead, reached as the environment says: ``AWS_ENDPOINT_URL``, ``AWS_*`` keys).
A save is timed from ``save()`` to its commit (arrays, manifest and its digests, commit);
``blocking_s`` is the part the training loop waits for. A restore is timed to the arrays being on
their devices; ``verify_s`` is the manifest check a resume runs first (every file read back and
hashed).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bench.common import RESULTS_DIR, print_table, write_result
from bench.timing import random_batch
from cli.args import Parser, run
from cli.config_args import add_config_arguments, config_arguments
from cli.host import quiet_tpu_probe, use_cpu_devices
from core.errors import UsageError
from train.checkpoint import Checkpointer
from train.config import CONFIG_DIR, Config, load_config
from train.program import Program
from train.store import filesystem, run_path

# configs/bench_dense_medium.yaml widened to GPT-2 small's body (113M parameters with its 384-token
# vocabulary); a short batch keeps each step a few seconds on a CPU host.
SIZE = ["model.d_model=768", "model.num_layers=12", "model.num_heads=12", "model.num_kv_heads=12",
        "model.mlp_dim=3072", "train.batch_size=8", "train.seq_len=32", "model.max_seq_len=32"]
STORES = ("disk", "s3")
BUCKET = "meshlm-bench"


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server (the test extra) in its own process on a free port, with one bucket; its
    endpoint and made-up credentials in this process's environment. Yields the bucket's URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        _create_bucket(f"s3://{BUCKET}")
        yield f"s3://{BUCKET}"
    finally:
        server.terminate()
        server.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _create_bucket(url: str, timeout_s: float = 30.0) -> None:
    fs, _ = filesystem(run_path(url + "/"))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fs.call_s3("create_bucket", Bucket=BUCKET)
            return
        except OSError:  # the server is still starting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _steps_while(program: Program, state: Any, batch: dict, busy: Any, limit: int) -> tuple[Any, list[float]]:
    """Runs train steps (each waited for) while ``busy()``, at most ``limit``; their times."""
    times: list[float] = []
    while busy() and len(times) < limit:
        start = time.perf_counter()
        state, metrics = program.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return state, times


def measure_store(cfg: Config, program: Program, state: Any, batch: dict, run_dir: str,
                  steps: int) -> tuple[dict[str, Any], Any]:
    """Save (alone, then with training steps alongside) and restore of ``state`` in ``run_dir``:
    (figures, the state after those steps: the step donates the one it is given)."""
    trainee = program.trainee
    saved = trainee.to_checkpoint(state)
    megabytes = sum(x.nbytes for x in jax.tree.leaves(saved)) / 1e6
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    checkpointer.save(1, saved, {"step": 1}, {"position": 0})  # a warm-up: thread pools, clients
    checkpointer.wait()
    start = time.perf_counter()
    checkpointer.save(2, saved, {"step": 2}, {"position": 0})
    blocking_s = time.perf_counter() - start
    checkpointer.wait()
    save_s = time.perf_counter() - start

    start = time.perf_counter()
    checkpointer.save(3, saved, {"step": 3}, {"position": 0})
    state, during = _steps_while(program, state, batch, checkpointer.manager.is_saving_in_progress,
                                 steps)
    checkpointer.wait()
    save_with_steps_s = time.perf_counter() - start
    checkpointer.close()

    reader = Checkpointer(run_dir, cfg.checkpoint, read_only=True)
    start = time.perf_counter()
    reader.verify(3)
    verify_s = time.perf_counter() - start
    start = time.perf_counter()
    restored, _, _ = reader.restore(3, *trainee.checkpoint_abstract)
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - start
    reader.close()
    return {"megabytes": megabytes, "save_s": save_s, "save_mb_per_s": megabytes / save_s,
            "blocking_s": blocking_s, "save_with_steps_s": save_with_steps_s,
            "step_s_during_save": float(np.median(during)) if during else None,
            "steps_during_save": len(during), "verify_s": verify_s, "restore_s": restore_s,
            "restore_mb_per_s": megabytes / restore_s}, state


def checkpoint_command(argv: Sequence[str]) -> int:
    parser = Parser(prog="python -m bench.checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--stores", default=",".join(STORES), help="disk, s3 or both")
    parser.add_argument("--s3", default="", help="an existing s3://BUCKET/PREFIX to measure; "
                        "default: a moto server started here")
    parser.add_argument("--steps", type=int, default=4, help="timed steps without a save")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    add_config_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    stores = args.stores.split(",")
    if unknown := sorted(set(stores) - set(STORES)):
        raise UsageError(f"--stores: unknown {', '.join(unknown)} (choose from {', '.join(STORES)})")
    path, overrides = config_arguments(args)
    cfg = load_config(path or CONFIG_DIR / "bench_dense_medium.yaml", [*SIZE, *overrides])
    quiet_tpu_probe()
    use_cpu_devices(8)
    program = Program(cfg)
    state = program.init()
    batch = program.global_batch(random_batch(cfg.train.batch_size, cfg.train.seq_len,
                                              cfg.model.vocab_size))
    state, _ = _steps_while(program, state, batch, lambda: True, 1)  # compiles
    state, alone = _steps_while(program, state, batch, lambda: True, args.steps)
    figures: dict[str, Any] = {"params_m": sum(x.size for x in jax.tree.leaves(state.params)) / 1e6,
                               "step_s": float(np.median(alone))}
    with tempfile.TemporaryDirectory(prefix="meshlm-bench-") as scratch:
        for store in stores:
            with contextlib.ExitStack() as stack:
                base = scratch if store == "disk" else args.s3 or stack.enter_context(s3_server())
                run_dir = f"{base}/{uuid.uuid4().hex[:8]}"
                figures[store], state = measure_store(cfg, program, state, batch, run_dir,
                                                      2 * args.steps)
                during = figures[store]["step_s_during_save"]
                figures[store]["step_slowdown"] = during / figures["step_s"] if during else None
    rows = [("parameters", f"{figures['params_m']:.1f}M"), ("train step", f"{figures['step_s']:.2f} s")]
    for store in stores:
        f = figures[store]
        slowdown = f"{f['step_slowdown']:.2f}x" if f["step_slowdown"] else "no step ran"
        rows += [(f"{store}: save", f"{f['save_mb_per_s']:.0f} MB/s ({f['megabytes']:.0f} MB in "
                                    f"{f['save_s']:.1f} s; the loop waits {f['blocking_s']:.2f} s)"),
                 (f"{store}: restore", f"{f['restore_mb_per_s']:.0f} MB/s (+ {f['verify_s']:.1f} s "
                                       "manifest check)"),
                 (f"{store}: step during a save", f"{slowdown} ({f['steps_during_save']} steps)")]
    print_table("checkpoints of a ~100M-parameter state (moto: a local Python server, a floor)", rows)
    out = write_result("checkpoint", {"model": {k: v for k, v in vars(cfg.model).items()
                                                if k in ("d_model", "num_layers", "mlp_dim")},
                                      "batch_size": cfg.train.batch_size,
                                      "seq_len": cfg.train.seq_len, "stores": stores},
                       figures, args.results)
    print(f"  wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(checkpoint_command, argv)


if __name__ == "__main__":
    sys.exit(main())
