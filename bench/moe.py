"""MoE step time against its dense twin (same active parameters), on one device and on the
8-device mesh: configs/moe_tiny.yaml (capacity 1.25 and dropless) vs configs/dense_tiny.yaml.
Target: the capacity path at most 1.3x the dense twin's step time on one device.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax

from bench.common import print_table, write_result
from bench.timing import step_seconds
from cli.args import Parser, run
from cli.host import quiet_tpu_probe, use_cpu_devices
from model.flops import param_counts
from train.config import CONFIG_DIR, load_config


def moe_command(argv: Sequence[str]) -> int:
    parser = Parser(prog="python -m bench.moe", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides of both presets")
    argv = parser.parse_args(argv).overrides
    quiet_tpu_probe()
    use_cpu_devices(8)
    dense = load_config(CONFIG_DIR / "dense_tiny.yaml", argv)
    cases = {
        "dense": dense,
        "moe_capacity": load_config(CONFIG_DIR / "moe_tiny.yaml", ["model.moe_impl=capacity", *argv]),
        "moe_dropless": load_config(CONFIG_DIR / "moe_tiny.yaml", ["model.moe_impl=dropless", *argv]),
    }
    figures: dict[str, float] = {}
    for name, cfg in cases.items():
        figures[f"{name}_1device_ms"] = 1e3 * step_seconds(cfg, devices=jax.devices()[:1])
        figures[f"{name}_mesh_ms"] = 1e3 * step_seconds(cfg)
    for where in ("1device", "mesh"):
        for impl in ("capacity", "dropless"):
            figures[f"{impl}_over_dense_{where}"] = (figures[f"moe_{impl}_{where}_ms"]
                                                     / figures[f"dense_{where}_ms"])
    rows = [(k, f"{v:.1f} ms" if k.endswith("_ms") else f"{v:.2f}x") for k, v in figures.items()]
    rows.append(("target", "capacity_over_dense_1device <= 1.30x"))
    print_table("MoE (moe_tiny, 8 experts top-2) vs dense twin (dense_tiny)", rows)
    counts = {name: param_counts(cfg.model) for name, cfg in cases.items()}
    path = write_result("moe", {"mesh": dict(vars(dense.mesh)), "batch_size": dense.train.batch_size,
                                "seq_len": dense.train.seq_len, "param_counts": counts},
                        {**figures, "meets_target": figures["capacity_over_dense_1device"] <= 1.3})
    print(f"  wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(moe_command, argv)


if __name__ == "__main__":
    sys.exit(main())
