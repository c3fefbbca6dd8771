"""The "baby GPT" CPU baseline (configs/bench_baby.yaml): 4 layers, 4 heads, d_model 128, context 64,
batch 12, byte tokens of tinyshakespeare (first 90% train, last 10% validation), 2000 steps;
reports ms/step, tokens/s, MFU and the validation loss (nanoGPT's published figures for the same
config: 1.886 validation loss; about 50 ms/step for its PyTorch eager run on this machine).

    python -m bench.baby [--data PATH] [--steps N] [--eval-batches N] [--devices N] [--no-torch]
                         [section.key=value ...]

The host runs as a data-parallel mesh of CPU devices, one per core (``--devices``; 0 = the most
cores that divide the batch). XLA:CPU runs one device's ops one after another, and at this size
most ops are too small to keep two cores busy, so one device per core is what uses the machine
(on 2 cores: about 44 against 60 ms/step on one device, measured back to back). The JAX backend
must not have started before ``main`` sets the count; if it has (e.g. under pytest's 8 emulated
devices), the existing CPU devices are used.

Unless ``--no-torch``, the same configuration also trains as a PyTorch eager program
(bench/torch_reference.py) in turns of ``CHUNK`` steps with meshlm's, so both step times are
measured under the same load and their ratio means something on a shared machine.

Batches are nanoGPT's: windows of T + 1 tokens at uniformly random offsets of the split, drawn by
a seeded generator; each is placed on the device while the previous step runs. Losses are
fetched a few steps behind (no host sync per step). The losses reported are means over
``--eval-batches`` random batches of each split, as nanoGPT estimates them.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bench.common import RESULTS_DIR, matmul_peak, print_table, write_result
from bench.timing import rss_bytes
from cli.args import Parser
from cli.args import run as run_command
from cli.host import quiet_tpu_probe, use_cpu_devices
from core.errors import ConfigError, UsageError
from model.flops import param_counts, train_flops_per_token
from sharding.mesh import MeshConfig, make_mesh
from train.config import CONFIG_DIR, Config, load_config
from train.optimizer import make_optimizer
from train.program import Program, memory_report

# nanoGPT's shakespeare_char corpus, kept in the repository so `make bench` runs from a clone alone
# (provenance and checksum in bench/data/SOURCE.md)
DEFAULT_DATA = Path(__file__).resolve().parent / "data/tinyshakespeare.txt"
NANOGPT_VAL_LOSS = 1.886  # nanoGPT README, baby GPT on shakespeare_char
NANOGPT_MS_PER_STEP = 50.0  # its PyTorch eager run of this config on this machine, quiet
TARGET_VAL_LOSS = 1.80
IN_FLIGHT = 4
CHUNK = 100  # steps per turn when meshlm and the PyTorch reference alternate


def load_splits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte ids of the file: (first 90%, last 10%)."""
    ids = np.frombuffer(path.read_bytes(), np.uint8).astype(np.int32)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:]


def window_rows(ids: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """[batch, T + 1] windows of ``ids`` at uniformly random offsets."""
    starts = rng.integers(0, len(ids) - seq_len - 1, batch)
    return ids[starts[:, None] + np.arange(seq_len + 1)]


def windows(ids: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch of ``batch`` random windows: inputs ids[i:i+T], targets ids[i+1:i+T+1]."""
    rows = window_rows(ids, batch, seq_len, rng)
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:],
            "weights": np.ones((batch, seq_len), np.float32)}


def device_count(requested: int, batch_size: int, cores: int) -> int:
    """``requested``, or (0) the most devices up to ``cores`` that divide ``batch_size``."""
    if requested:
        return requested
    return max(n for n in range(1, max(1, cores) + 1) if batch_size % n == 0)


def cpu_devices(count: int) -> list:
    """``count`` CPU devices: the JAX backend is started with that many if it has not started
    yet (under pytest it has: the existing ones are used); ConfigError if fewer exist."""
    use_cpu_devices(count, unless_started=True)
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise ConfigError("--devices", f"{count} CPU devices asked for, {len(devices)} exist")
    return devices[:count]


def run(cfg: Config, data: Path, eval_batches: int, devices: list, reference: Any = None) -> dict:
    """Trains (data parallel over ``devices``) and evaluates; ``reference`` (a
    bench.torch_reference.TorchBaby) takes turns of ``CHUNK`` steps with meshlm on its own stream
    of the same random windows."""
    train_ids, val_ids = load_splits(data)
    if min(len(train_ids), len(val_ids)) <= cfg.train.seq_len + 1:
        raise ConfigError("--data", f"{data} is too short for windows of {cfg.train.seq_len + 1} bytes")
    t = cfg.train
    program = Program(cfg, mesh=make_mesh(MeshConfig(data=len(devices)), devices))
    rng = np.random.default_rng(t.seed)

    def next_batch(ids: np.ndarray) -> dict:
        return {k: jax.device_put(v, program.batch_sharding)
                for k, v in windows(ids, t.batch_size, t.seq_len, rng).items()}

    state = program.init()
    batch = next_batch(train_ids)
    start = time.perf_counter()
    step = program.lower_train_step(batch).compile()  # windows of one text: no packing fields
    eval_step = program.lower_eval_step(batch).compile()
    compile_s = time.perf_counter() - start
    losses, train_s, ref = [], 0.0, {"train_s": 0.0, "losses": []}
    in_flight: collections.deque = collections.deque()
    ref_rng = np.random.default_rng(t.seed)
    for done in range(0, t.steps, CHUNK):
        turn = min(CHUNK, t.steps - done)
        start = time.perf_counter()
        state, batch = _meshlm_turn(step, state, batch, lambda: next_batch(train_ids), turn,
                                    in_flight, losses)
        if reference is not None or done + turn == t.steps:  # no work left running
            losses += [float(x) for x in in_flight]
            in_flight.clear()
        train_s += time.perf_counter() - start
        if reference is not None:
            start = time.perf_counter()
            ref["losses"] += [reference.step(window_rows(train_ids, t.batch_size, t.seq_len, ref_rng))
                              for _ in range(turn)]
            ref["train_s"] += time.perf_counter() - start

    def split_loss(ids: np.ndarray) -> float:
        return _mean_loss(eval_step, state.params, (next_batch(ids) for _ in range(eval_batches)),
                          eval_batches)

    val_loss, train_loss = split_loss(val_ids), split_loss(train_ids)
    ref_figures = {} if reference is None else _reference_figures(
        reference, ref, t, eval_batches, val_ids, train_ids, ref_rng)
    return {**ref_figures, "devices": len(devices),
            "ms_per_step": 1e3 * train_s / t.steps, "train_s": train_s, "compile_s": compile_s,
            "val_loss": val_loss, "train_loss": train_loss, "last_batch_loss": losses[-1],
            "loss_every_100": losses[99::100], "xla_memory_bytes": memory_report(step), **rss_bytes()}


def _meshlm_turn(step: Any, state: Any, batch: dict, next_batch: Any, turn: int,
                 in_flight: collections.deque, losses: list[float]) -> tuple[Any, dict]:
    """``turn`` train steps, each next batch made and sent while the step runs; losses are fetched
    at most ``IN_FLIGHT`` steps behind."""
    for _ in range(turn):
        state, metrics = step(state, batch, None)
        batch = next_batch()
        in_flight.append(metrics["loss"])
        while len(in_flight) > IN_FLIGHT:
            losses.append(float(in_flight.popleft()))
    return state, batch


def _mean_loss(eval_step: Any, params: Any, batches: Iterator[dict], count: int) -> float:
    """Mean token loss over ``count`` batches, each made while at most ``IN_FLIGHT`` eval steps
    are in flight."""
    pending: collections.deque = collections.deque()
    loss_sum = weight_sum = 0.0
    for i in range(count + IN_FLIGHT):
        if i < count:
            pending.append(eval_step(params, next(batches), None))
        if i >= IN_FLIGHT:
            sums = pending.popleft()
            loss_sum += float(sums["loss_sum"])
            weight_sum += float(sums["weight_sum"])
    return loss_sum / weight_sum


def _reference_figures(reference: Any, ref: dict, t: Any, eval_batches: int, val_ids: np.ndarray,
                       train_ids: np.ndarray, ref_rng: np.random.Generator) -> dict:
    def ref_loss(ids: np.ndarray) -> float:
        return float(np.mean([reference.loss(window_rows(ids, t.batch_size, t.seq_len, ref_rng))
                              for _ in range(eval_batches)]))

    return {"torch_ms_per_step": 1e3 * ref["train_s"] / t.steps,
            "torch_val_loss": ref_loss(val_ids), "torch_train_loss": ref_loss(train_ids),
            "torch_last_batch_loss": ref["losses"][-1]}


def build_parser() -> Parser:
    parser = Parser(prog="python -m bench.baby", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a text file (bytes)")
    parser.add_argument("--steps", type=int, default=0, help="0: the preset's train.steps (2000)")
    parser.add_argument("--eval-batches", type=int, default=200)
    parser.add_argument("--name", default="baby", help="results file NAME.json")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where JSON results go")
    parser.add_argument("--devices", type=int, default=0,
                        help="CPU devices of the data-parallel mesh (0: one per core that divides "
                             "the batch)")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip the PyTorch eager reference that takes turns with meshlm")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def torch_reference(cfg: Config) -> Any:
    """The PyTorch eager baby GPT on meshlm's own learning-rate schedule (evaluated once, after the
    devices are set: evaluating it starts JAX's backend)."""
    # torch is a test-only dependency (several hundred MB): imported only when the reference runs
    try:
        from bench.torch_reference import TorchBaby
    except ImportError:
        raise UsageError("the PyTorch reference needs torch (pip install -e '.[test]'); or pass "
                         "--no-torch") from None
    _, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    lrs = np.asarray(jax.vmap(schedule)(np.arange(cfg.train.steps)))
    return TorchBaby(cfg.model, cfg.optim, lrs, cfg.train.seed)


def baby_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.steps < 0 or args.eval_batches < 1 or args.devices < 0:
        raise UsageError("--steps and --devices must be >= 0 and --eval-batches >= 1")
    if not args.data.is_file():
        raise UsageError(f"--data: no such file {args.data}")
    quiet_tpu_probe()
    cfg = load_config(CONFIG_DIR / "bench_baby.yaml",
                      [*([f"train.steps={args.steps}"] if args.steps else []), *args.overrides])
    count = device_count(args.devices, cfg.train.batch_size, os.cpu_count() or 1)
    if cfg.train.batch_size % count:
        raise ConfigError("--devices", f"{count} devices do not divide the batch of "
                                       f"{cfg.train.batch_size} rows")
    devices = cpu_devices(count)
    reference = None if args.no_torch else torch_reference(cfg)
    figures = run(cfg, args.data, args.eval_batches, devices, reference)
    report(cfg, args, figures, reference is not None)
    return 0


def report(cfg: Config, args: Any, figures: dict, with_torch: bool) -> None:
    """Adds the derived figures, prints the table and writes the JSON result."""
    t, m = cfg.train, cfg.model
    tokens_per_s = t.batch_size * t.seq_len / (figures["ms_per_step"] / 1e3)
    peak = matmul_peak(m.dtype)
    figures.update(tokens_per_s=tokens_per_s, peak_flops_per_s=peak,
                   mfu=tokens_per_s * train_flops_per_token(m, t.seq_len) / peak,
                   faster_than_nanogpt=figures["ms_per_step"] < NANOGPT_MS_PER_STEP,
                   meets_val_loss_target=figures["val_loss"] <= TARGET_VAL_LOSS)
    rows = []
    if with_torch:
        figures.update(torch_over_meshlm=figures["torch_ms_per_step"] / figures["ms_per_step"],
                       faster_than_torch_same_run=figures["ms_per_step"] < figures["torch_ms_per_step"])
        rows = [("PyTorch eager, same run", f"{figures['torch_ms_per_step']:.1f} ms/step (meshlm is "
                 f"{figures['torch_over_meshlm']:.2f}x as fast), validation loss "
                 f"{figures['torch_val_loss']:.3f}")]
    print_table(f"baby GPT: {param_counts(m)['total'] / 1e6:.2f}M params, {t.steps} steps of "
                f"{t.batch_size} x {t.seq_len} bytes of {args.data.name}, {figures['devices']} CPU "
                f"device(s), data parallel", [
        ("ms/step", f"{figures['ms_per_step']:.1f} (nanoGPT PyTorch eager here: about "
                    f"{NANOGPT_MS_PER_STEP:.0f} quiet)"),
        ("tokens/s", f"{tokens_per_s:,.0f}"),
        ("MFU", f"{figures['mfu']:.1%} of {peak / 1e9:.0f} GFLOP/s ({m.dtype} matmul peak)"),
        ("validation loss", f"{figures['val_loss']:.3f} (target <= {TARGET_VAL_LOSS}; nanoGPT "
                            f"{NANOGPT_VAL_LOSS})"),
        ("train loss", f"{figures['train_loss']:.3f}"),
        ("compile", f"{figures['compile_s']:.1f} s"),
        *rows,
    ])
    path = write_result(args.name, {"data": str(args.data), "steps": t.steps,
                                    "batch_size": t.batch_size, "seq_len": t.seq_len,
                                    "model": cfg.to_dict()["model"], "optim": cfg.to_dict()["optim"],
                                    "eval_batches": args.eval_batches}, figures, args.results)
    print(f"  wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(baby_command, argv)


if __name__ == "__main__":
    sys.exit(main())
