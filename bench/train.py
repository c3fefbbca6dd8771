"""Train-step benchmarks of the medium presets: tokens/s, model FLOP/s, MFU against a float32 matmul
peak measured in the same run, compile time, and memory (XLA's analysis and the process's RSS).

    python -m bench.train CASE [--steps N] [section.key=value ...]
    python -m bench.train summary

Cases (one per invocation, so a long run never holds the machine for all of them):
``dense_medium`` (configs/bench_dense_medium.yaml, 25M parameters, seq 512) on one device, and
``dense_medium_bf16``, the same in bfloat16 compute (its MFU is against the bfloat16 matmul peak);
``dense_medium_mesh``, the same step data-parallel over the 8-device mesh (the cost of
partitioning on one host); ``moe_medium_capacity`` and ``moe_medium_dropless``
(configs/bench_moe_medium.yaml: 8 experts top-2, the same active size) on one device. Each writes
bench/results/train_CASE.json; ``summary`` reads them and prints the ratios (mesh over one device,
MoE over its dense twin) without running anything.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from bench.common import RESULTS_DIR, matmul_peak, print_table, write_result
from bench.timing import measure_train_step
from cli.args import Parser, run
from cli.host import quiet_tpu_probe, use_cpu_devices
from core.errors import UsageError
from model.flops import accounting, train_flops_per_token
from train.config import CONFIG_DIR, load_config

CASES = {  # name: (preset, overrides, devices: 1 or 0 = all)
    "dense_medium": ("bench_dense_medium.yaml", [], 1),
    "dense_medium_bf16": ("bench_dense_medium.yaml", ["model.dtype=bfloat16"], 1),
    "dense_medium_mesh": ("bench_dense_medium.yaml", [], 0),
    "moe_medium_capacity": ("bench_moe_medium.yaml", ["model.moe_impl=capacity"], 1),
    "moe_medium_dropless": ("bench_moe_medium.yaml", ["model.moe_impl=dropless"], 1),
}
MFU_TARGET = 0.5
MOE_TARGET = 1.3


def run_case(name: str, steps: int, overrides: list[str], results: Path = RESULTS_DIR) -> dict:
    """Measures one case; returns its figures (and writes its JSON)."""
    preset, case_overrides, count = CASES[name]
    cfg = load_config(CONFIG_DIR / preset, [*case_overrides, *overrides])
    devices = jax.devices()[:count] if count else jax.devices()
    dtype = cfg.model.dtype
    peak_before = matmul_peak(dtype)
    step = measure_train_step(cfg, steps, devices)
    peak = max(peak_before, matmul_peak(dtype))  # the better of two: MFU errs low, not high
    peak32 = peak if dtype == "float32" else matmul_peak("float32")
    t = cfg.train
    tokens_per_s = t.batch_size * t.seq_len / step["step_s"]
    model_flops_per_s = tokens_per_s * train_flops_per_token(cfg.model, t.seq_len)
    figures = {"step_ms": 1e3 * step["step_s"], "tokens_per_s": tokens_per_s,
               "model_flops_per_s": model_flops_per_s, "peak_flops_per_s": peak,
               "mfu": model_flops_per_s / peak, "mfu_vs_float32_peak": model_flops_per_s / peak32,
               "compute_dtype": dtype, "compile_s": step["compile_s"],
               "xla_memory_bytes": step["memory"], "rss_bytes": step["rss"],
               "rss_peak_bytes": step["rss_peak"], "loss_after": step["final_loss"],
               "step_times_ms": [1e3 * s for s in step["step_times_s"]], "devices": len(devices)}
    mem = step["memory"]
    print_table(f"train step: {name} ({preset}, {len(devices)} device(s), batch {t.batch_size} x "
                f"seq {t.seq_len}, median of {steps})", [
        ("step", f"{figures['step_ms']:,.0f} ms"),
        ("tokens/s", f"{tokens_per_s:,.0f}"),
        ("model FLOP/s", f"{model_flops_per_s / 1e9:.1f} G"),
        ("measured matmul peak", f"{peak / 1e9:.1f} G ({dtype}, best square matmul, one device)"),
        ("MFU", f"{figures['mfu']:.1%} (target >= {MFU_TARGET:.0%} for dense_medium)"),
        ("compile", f"{step['compile_s']:.1f} s"),
        ("XLA memory / device", f"{mem.get('total', 0) / 2**20:,.0f} MiB (temporaries "
                                f"{mem.get('temporaries', 0) / 2**20:,.0f} MiB)"),
        ("process RSS (peak)", f"{step['rss'] / 2**20:,.0f} MiB ({step['rss_peak'] / 2**20:,.0f} MiB)"),
    ])
    path = write_result(f"train_{name}", {"preset": preset, "overrides": [*case_overrides, *overrides],
                                          "model": cfg.to_dict()["model"],
                                          "batch_size": t.batch_size, "seq_len": t.seq_len,
                                          "steps_timed": steps,
                                          "accounting": accounting(cfg.model, t.seq_len)}, figures,
                        results)
    print(f"  wrote {path}")
    return figures


def summary(results: Path = RESULTS_DIR) -> int:
    """Ratios across the cases' latest JSON files (nothing is run)."""
    records = {}
    for name in CASES:
        path = results / f"train_{name}.json"
        if path.is_file():
            records[name] = json.loads(path.read_text())
    rows = [(name, f"{r['figures']['step_ms']:,.0f} ms, MFU {r['figures']['mfu']:.1%} "
                   f"({r['git_commit']}, {r['time']})") for name, r in records.items()]
    ratios = {}
    dense = records.get("dense_medium")
    if dense:
        for other in ("dense_medium_bf16", "dense_medium_mesh", "moe_medium_capacity",
                      "moe_medium_dropless"):
            if other in records:
                ratios[f"{other}_over_dense_medium"] = (records[other]["figures"]["step_ms"]
                                                        / dense["figures"]["step_ms"])
    rows += [(k, f"{v:.2f}x") for k, v in ratios.items()]
    rows.append(("targets", f"dense_medium MFU >= {MFU_TARGET:.0%}; MoE <= {MOE_TARGET}x dense"))
    print_table("train-step benchmarks (latest results)", rows or [("none", "run a case first")])
    if records:
        write_result("train_summary", {"cases": list(records)}, {
            **ratios, "dense_medium_mfu": dense["figures"]["mfu"] if dense else None,
            "meets_mfu_target": bool(dense and dense["figures"]["mfu"] >= MFU_TARGET),
            "meets_moe_target": ratios.get("moe_medium_capacity_over_dense_medium", 9.9) <= MOE_TARGET},
            results)
    return 0


def train_bench_command(argv: Sequence[str]) -> int:
    parser = Parser(prog="python -m bench.train", description=__doc__.split("\n")[0])
    parser.add_argument("case", choices=[*CASES, "summary"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where JSON results go")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args(argv)
    if args.steps < 1:
        raise UsageError("--steps must be >= 1")
    if args.case == "summary":
        return summary(args.results)
    quiet_tpu_probe()
    use_cpu_devices(8)
    run_case(args.case, args.steps, args.overrides, args.results)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(train_bench_command, argv)


if __name__ == "__main__":
    sys.exit(main())
