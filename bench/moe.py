"""MoE benchmarks: step time against a dense twin with the same active parameters, and the expert
load balance of a real training run.

    python -m bench.moe [--steps N] [--rounds R] [--balance-steps S] [--results DIR] [overrides]

Step time (``bench.timing.step_seconds``: the median of N steps after a warm-up, the best of R
rounds over all cases, which run in turn, so a slow spell of this shared 2-core host does not
land on one case), on one device and on the presets' 8-device mesh (data=2 x expert=4: experts
sharded 4 ways), for the capacity and dropless paths, of two pairs (``PAIRS``):

- ``tiny``: configs/moe_tiny.yaml (8 experts of width 64, top-2) against configs/dense_tiny.yaml
  (a 128-wide MLP = 2 x 64);
- ``fine``: configs/moe_fine_tiny.yaml (64 experts of width 16, top-8, one shared expert of width
  16) against dense_tiny with a 144-wide MLP (= (8 + 1) x 16). Target: at most ``TARGET`` x the
  dense twin's step time on one device and on the mesh.

Both models of a pair have the same active parameters but for the router (``model.flops
.param_counts``, printed). The fine pair's mesh program is checked to exchange tokens once per
device and direction (``all_to_alls`` in the scanned layer's program: one all-to-all each way,
forward and backward, carrying all 16 experts of a device).

Balance (``--balance-steps``, default 300; 0 skips it): configs/moe_tiny.yaml trained by the real
loop (``train.loop.train``) on its corpus (the standard library, byte tokens: what `make train`
uses) with the Switch loss as the preset has it, and with aux-loss-free balancing (``AUX_FREE``:
sigmoid routing, a bias moved by router_bias_rate, no Switch loss). From metrics.jsonl (one record
a step): each layer's max/mean expert load of the last batch and of the mean load over the last
``TAIL`` steps, the dropped fraction (last batch, mean over the tail), the language-model loss
(mean over the tail) and the held-out loss at the end.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bench.common import RESULTS_DIR, print_table, write_result
from bench.timing import random_batch, step_seconds
from cli.args import Parser, run
from cli.host import quiet_tpu_probe, use_cpu_devices
from model.flops import param_counts
from model.moe import load_max_over_mean
from train.config import CONFIG_DIR, Config, load_config
from train.loop import train
from train.program import Program
from train.run_dir import METRICS_FILE
from train.validate import validate

PAIRS = {  # name: (MoE preset, dense twin preset, the twin's overrides)
    "tiny": ("moe_tiny.yaml", "dense_tiny.yaml", []),
    "fine": ("moe_fine_tiny.yaml", "dense_tiny.yaml", ["model.mlp_dim=144"]),
}
IMPLS = ("capacity", "dropless")
PLACES = ("1device", "mesh")
TARGET = 1.5  # fine-grained MoE over its dense twin
# Aux-loss-free balancing (DeepSeek-V3) of the balance benchmark: moe_tiny's model with these.
AUX_FREE = ["model.router_mode=sigmoid_topk", "model.router_bias_rate=0.005",
            "model.aux_loss_coef=0.0"]
TAIL = 100  # steps at the end of a balance run whose mean load is reported


def timing_cases(overrides: list[str]) -> dict[str, Config]:
    """Every timed config: ``{pair}_dense``, ``{pair}_capacity``, ``{pair}_dropless``."""
    cases = {}
    for pair, (moe, dense, twin) in PAIRS.items():
        cases[f"{pair}_dense"] = load_config(CONFIG_DIR / dense, [*twin, *overrides])
        for impl in IMPLS:
            cases[f"{pair}_{impl}"] = load_config(CONFIG_DIR / moe, [f"model.moe_impl={impl}",
                                                                   *overrides])
    for cfg in cases.values():
        validate(cfg, jax.device_count())
    return cases


def step_times(cases: dict[str, Config], steps: int, rounds: int) -> dict[str, float]:
    """``{case}_{place}_ms``: the best over ``rounds`` of the median step time, and the MoE over
    dense ratios ``{pair}_{impl}_over_dense_{place}``."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, cfg in cases.items():
            for place in PLACES:
                devices = jax.devices()[:1] if place == "1device" else None
                ms = 1e3 * step_seconds(cfg, steps, devices)
                key = f"{name}_{place}_ms"
                best[key] = min(best.get(key, ms), ms)
    ratios = {f"{pair}_{impl}_over_dense_{place}":
              best[f"{pair}_{impl}_{place}_ms"] / best[f"{pair}_dense_{place}_ms"]
              for pair in PAIRS for impl in IMPLS for place in PLACES}
    return best | ratios


def all_to_alls(cfg: Config) -> int:
    """All-to-all collectives in the mesh train step of ``cfg`` (lowered, not compiled)."""
    program = Program(cfg)
    batch = random_batch(cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size)
    batch = {k: jax.device_put(v, program.batch_sharding) for k, v in batch.items()}
    return program.lower_train_step(batch).as_text().count("all_to_all")


def balance_run(overrides: list[str], steps: int, run_dir: Path) -> dict[str, Any]:
    """Trains moe_tiny (with ``overrides``) for ``steps`` steps in ``run_dir``; its balance figures
    from metrics.jsonl."""
    cfg = load_config(CONFIG_DIR / "moe_tiny.yaml", [
        f"train.steps={steps}", "train.log_every=1", "train.sample_tokens=0", "checkpoint.every=0",
        "run.tensorboard=false", "run.progress=false", f"run.dir={run_dir}", *overrides])
    validate(cfg, jax.device_count())
    summary = train(cfg, hooks=())
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    steps_ = [r for r in records if "expert_load" in r]
    tail = steps_[-TAIL:]
    last_le = np.asarray(steps_[-1]["expert_load"])
    tail_le = np.mean([r["expert_load"] for r in tail], axis=0)

    def max_over_mean(load_le: np.ndarray) -> list[float]:
        return np.asarray(load_max_over_mean(load_le)).round(3).tolist()

    return {"last_load_max_over_mean_per_layer": max_over_mean(last_le),
            "tail_load_max_over_mean_per_layer": max_over_mean(tail_le),
            "last_dropped_frac": steps_[-1]["moe_dropped_frac"],
            "tail_dropped_frac": float(np.mean([r["moe_dropped_frac"] for r in tail])),
            "tail_loss": float(np.mean([r["loss"] for r in tail])),
            "last_loss": steps_[-1]["loss"], "eval_loss": summary.get("eval_loss"),
            "tail_steps": len(tail), "router_bias_last": steps_[-1].get("moe_router_bias"),
            "model": {k: getattr(cfg.model, k) for k in (
                "router_mode", "aux_loss_coef", "router_bias_rate", "capacity_factor",
                "z_loss_coef", "num_experts", "experts_per_token")}}


def balance(overrides: list[str], steps: int) -> dict[str, dict[str, Any]]:
    """The Switch-loss run (moe_tiny as it is) and the aux-loss-free run (``AUX_FREE``)."""
    out = {}
    for name, extra in (("switch", []), ("aux_free", AUX_FREE)):
        with tempfile.TemporaryDirectory() as directory:
            out[name] = balance_run([*extra, *overrides], steps, Path(directory) / "run")
    return out


def report(figures: dict[str, float], counts: dict[str, dict[str, int]],
           balanced: dict[str, dict[str, Any]]) -> None:
    rows = [(k, f"{v:.1f} ms" if k.endswith("_ms") else f"{v:.2f}x") for k, v in figures.items()
            if k.endswith(("_ms", "_dense_1device", "_dense_mesh"))]
    rows += [(f"{name} params", f"active {c['active']:,} of {c['total']:,}")
             for name, c in counts.items() if not name.endswith("dropless")]
    rows += [("fine mesh all-to-alls", f"{figures['fine_capacity_mesh_all_to_alls']:.0f} in the "
              "scanned layer: one each way, forward and backward, for 16 experts a device"),
             ("target", f"fine_*_over_dense_* <= {TARGET:.1f}x")]
    print_table("MoE step time (mesh: data=2 x expert=4) against the dense twin", rows)
    for name, b in balanced.items():
        print_table(f"balance after {b['tail_steps']} of the last steps, moe_tiny, {name}: "
                    f"{b['model']}", [(k, str(v)) for k, v in b.items() if k != "model"])


def moe_command(argv: Sequence[str]) -> int:
    parser = Parser(prog="python -m bench.moe", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all cases (best kept)")
    parser.add_argument("--balance-steps", type=int, default=300,
                        help="steps of each balance run (0: no balance runs)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where moe.json goes")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides of every preset")
    args = parser.parse_args(argv)
    quiet_tpu_probe()
    use_cpu_devices(8)
    cases = timing_cases(args.overrides)
    figures: dict[str, float] = step_times(cases, args.steps, args.rounds)
    figures["fine_capacity_mesh_all_to_alls"] = all_to_alls(cases["fine_capacity"])
    fine = [figures[f"fine_{impl}_over_dense_{place}"] for impl in IMPLS for place in PLACES]
    counts = {name: param_counts(cfg.model) for name, cfg in cases.items()}
    balanced = balance(args.overrides, args.balance_steps) if args.balance_steps else {}
    report(figures, counts, balanced)
    dense = cases["tiny_dense"]
    path = write_result("moe", {"mesh": dict(vars(dense.mesh)), "batch_size": dense.train.batch_size,
                                "seq_len": dense.train.seq_len, "pairs": PAIRS, "aux_free": AUX_FREE,
                                "param_counts": counts, "steps": args.steps, "rounds": args.rounds},
                        {**figures, "meets_target": max(fine) <= TARGET, "balance": balanced},
                        args.results)
    print(f"  wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(moe_command, argv)


if __name__ == "__main__":
    sys.exit(main())
