"""Long-context training steps on this CPU: tokens/s and XLA temporary memory per device of one
train step against sequence length, for three attention paths, with a fitted growth exponent.

    python -m bench.longctx [--lengths 1024,2048,...] [--paths einsum,blockwise,context]
                            [--steps N] [--budget-gib G] [--results DIR]

The model is a small dense decoder (``MODEL``: d_model 128, 2 layers, 4 heads, vocab 384, batch 1,
one unpacked row) trained by the real sharded train step of ``train.program.Program``. Paths:
``einsum`` (``model.attention_impl=einsum``: the [B, N, T, T] scores) and ``blockwise`` (query
blocks of 128 rows) on one CPU device (``mesh.data=1``); ``context`` (``mesh.context=8``, the
sequence sharded over 8 emulated CPU devices, blockwise local queries over gathered keys/values).
Each (path, length) is compiled once; temporaries are XLA's ``memory_analysis`` of that program,
per device. A program whose temporaries exceed ``--budget-gib`` is not run (this host has 24 GiB
and 2 cores shared): its time reads "not run: needs X GiB". Timed steps follow one warm-up step,
fewer at long lengths (``steps_at``); the whole run takes about 5 minutes on this 2-core host.
The growth exponent of a path is the slope of log(temporaries) against log(T): 1 is linear, 2
quadratic; it is fitted over every length and over the last doubling.

The ``context`` path uses all 8 emulated devices of a 2-core host, so its tokens/s is not
comparable with the one-device paths; ``fastest_one_device_path`` names the fastest one-device
attention path at each length (what ``attention_impl=auto`` picks on CPU is decided from it).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bench.common import RESULTS_DIR, print_table, write_result
from bench.timing import random_batch, rss_bytes
from cli.args import Parser, run
from cli.host import quiet_tpu_probe, use_cpu_devices
from core.errors import UsageError
from sharding.axes import MESH_AXES
from sharding.mesh import make_mesh
from train.config import Config, build_config
from train.program import Program, memory_report
from train.validate import validate

MODEL = ["model.vocab_size=384", "model.d_model=128", "model.num_layers=2", "model.num_heads=4",
         "model.num_kv_heads=4", "model.mlp_dim=512", "train.batch_size=1", "data.tokenizer=byte",
         "data.streams=1"]
CONTEXT = 8
PATHS = {  # name: (overrides, devices)
    "einsum": (["model.attention_impl=einsum", "mesh.data=1"], 1),
    "blockwise": (["model.attention_impl=blockwise", "mesh.data=1"], 1),
    "context": (["model.attention_impl=blockwise", "mesh.data=1", f"mesh.context={CONTEXT}"], CONTEXT),
}
LENGTHS = (1024, 2048, 4096, 8192, 16384)
LINEAR_BOUND = 1.5  # closer to linear (1) than quadratic (2) over the last doubling: "linear"
GIB = 2 ** 30


def steps_at(seq_len: int, steps: int) -> int:
    """Timed steps at ``seq_len``: ``steps`` at 1k tokens, halved per doubling, at least 1."""
    return max(1, min(steps, steps * 1024 // seq_len))


def path_config(path: str, seq_len: int) -> Config:
    overrides, _ = PATHS[path]
    return build_config({}, [*MODEL, *overrides, f"model.max_seq_len={seq_len}",
                             f"train.seq_len={seq_len}"])


def measure(path: str, seq_len: int, steps: int, budget_bytes: int) -> dict[str, Any]:
    """Compiles the train step of ``path`` at ``seq_len``; runs it unless its temporaries exceed
    ``budget_bytes``. Returns the row of the results table."""
    row: dict[str, Any] = {"path": path, "seq_len": seq_len}
    if path == "context" and "context" not in MESH_AXES:
        return {**row, "not_run": "no context mesh axis in sharding/axes.py yet"}
    cfg = path_config(path, seq_len)
    devices = jax.devices()[:PATHS[path][1]]
    validate(cfg, len(devices))
    program = Program(cfg, mesh=make_mesh(cfg.mesh, devices))
    batch = {k: jax.device_put(v, program.batch_sharding)
             for k, v in random_batch(1, seq_len, cfg.model.vocab_size).items()}
    start = time.perf_counter()
    compiled = program.lower_train_step(batch).compile()
    memory = memory_report(compiled)
    row.update(devices=len(devices), compile_s=time.perf_counter() - start,
               temp_bytes=memory.get("temporaries", 0), xla_memory_bytes=memory)
    if row["temp_bytes"] > budget_bytes:
        return {**row, "not_run": f"not run: needs {row['temp_bytes'] / GIB:.1f} GiB of temporaries "
                                  f"(budget {budget_bytes / GIB:.1f} GiB)"}
    state, frozen = program.init(), program.trainee.frozen
    state, metrics = compiled(state, batch, frozen)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps_at(seq_len, steps)):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, frozen)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    return {**row, "step_ms": 1e3 * step_s, "tokens_per_s": seq_len / step_s, "steps_timed": len(times),
            "loss": float(jax.device_get(metrics["loss"])), **rss_bytes()}


def growth_exponents(rows: list[dict[str, Any]], path: str) -> dict[str, float | None]:
    """Slopes of log(temporaries) over log(T) of ``path``'s compiled rows: least squares over all
    lengths, and between the two longest."""
    points = sorted((r["seq_len"], r["temp_bytes"]) for r in rows
                    if r["path"] == path and r.get("temp_bytes", 0) > 0)
    if len(points) < 2:
        return {"all": None, "last_doubling": None}
    log_t, log_m = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    (t0, m0), (t1, m1) = points[-2:]
    return {"all": float(np.polyfit(log_t, log_m, 1)[0]),
            "last_doubling": math.log(m1 / m0) / math.log(t1 / t0)}


def fastest(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The one-device path with the most tokens/s at each length that ran any."""
    best: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r.get("tokens_per_s") and r["path"] != "context":
            if r["seq_len"] not in best or r["tokens_per_s"] > best[r["seq_len"]]["tokens_per_s"]:
                best[r["seq_len"]] = r
    return {str(t): r["path"] for t, r in sorted(best.items())}


def _row_text(r: dict[str, Any]) -> str:
    if "temp_bytes" not in r:
        return r["not_run"]
    speed = r.get("not_run") or (f"{r['tokens_per_s']:9,.0f} tokens/s ({r['step_ms']:,.0f} ms, "
                                 f"median of {r['steps_timed']})")
    return (f"temporaries {r['temp_bytes'] / 2**20:8,.1f} MiB/device, compile {r['compile_s']:5.1f} s, "
            f"{speed}")


def report(rows: list[dict[str, Any]], paths: list[str], args: Any, wall_s: float) -> Path:
    """Prints the table and writes bench/results/longctx.json (or ``args.results``)."""
    exponents = {p: growth_exponents(rows, p) for p in paths}
    linear = {p: e["last_doubling"] is not None and e["last_doubling"] <= LINEAR_BOUND
              for p, e in exponents.items()}
    table = [(f"{r['path']:<9} T={r['seq_len']:>6}", _row_text(r)) for r in rows]
    table += [(f"{p} growth exponent", "n/a" if e["all"] is None else
               f"{e['all']:.2f} over all lengths, {e['last_doubling']:.2f} over the last doubling")
              for p, e in exponents.items()]
    table += [("fastest one-device path", ", ".join(f"{t}: {p}" for t, p in fastest(rows).items())),
              ("wall time", f"{wall_s:.0f} s")]
    print_table("long context: train step of a dense model (d_model 128, 2 layers, 4 heads), batch 1; "
                "temporaries are XLA's analysis per device", table)
    figures = {"rows": rows, "growth_exponent": {p: e["all"] for p, e in exponents.items()},
               "growth_exponent_last_doubling": {p: e["last_doubling"] for p, e in exponents.items()},
               "linear_memory": linear, "fastest_one_device_path": fastest(rows), "wall_s": wall_s}
    config = {"model_overrides": MODEL, "paths": {p: PATHS[p][0] for p in paths},
              "lengths": [int(t) for t in args.lengths.split(",")], "steps": args.steps,
              "budget_bytes": int(args.budget_gib * GIB), "linear_bound": LINEAR_BOUND}
    return write_result("longctx", config, figures, args.results)


def longctx_command(argv: Sequence[str]) -> int:
    parser = Parser(prog="python -m bench.longctx", description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="sequence lengths")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"some of {', '.join(PATHS)}")
    parser.add_argument("--steps", type=int, default=4, help="timed steps at 1k tokens (fewer longer)")
    parser.add_argument("--budget-gib", type=float, default=6.0,
                        help="programs needing more temporaries than this are compiled, not run")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where JSON results go")
    args = parser.parse_args(argv)
    paths = args.paths.split(",")
    try:
        lengths = [int(t) for t in args.lengths.split(",")]
    except ValueError:
        raise UsageError(f"--lengths: expected comma-separated integers, got {args.lengths!r}") from None
    if min(lengths) < 1 or args.steps < 1 or args.budget_gib <= 0:
        raise UsageError("--lengths and --steps must be >= 1 and --budget-gib > 0")
    if unknown := sorted(set(paths) - set(PATHS)):
        raise UsageError(f"--paths: unknown {', '.join(unknown)} (known: {', '.join(PATHS)})")
    quiet_tpu_probe()
    use_cpu_devices(CONTEXT, unless_started=True)
    start = time.perf_counter()
    rows = [measure(p, t, args.steps, int(args.budget_gib * GIB)) for p in paths for t in lengths]
    path = report(rows, paths, args, time.perf_counter() - start)
    print(f"  wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(longctx_command, argv)


if __name__ == "__main__":
    sys.exit(main())
