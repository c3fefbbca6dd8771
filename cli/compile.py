"""``python -m train.compile --topology NAME [CONFIG.yaml] [section.key=value ...] [--json]``: compiles
the real train step ahead of time for a TPU topology on any host (libtpu, no TPU needed) and reports
HBM per chip, FLOPs per step and a roofline estimate of step time and MFU.

Exit 2 with one ``error:`` line for a bad argument or config, an unknown topology, a missing libtpu,
or a config that does not fit in HBM (the report is still printed on stdout in that last case).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax

from cli.args import Parser, add_json_argument, run
from cli.config_args import add_config_arguments, config_arguments, config_keys_help, config_of
from core.errors import UsageError
from train.aot import check_fits, compile_report


def build_parser() -> Parser:
    parser = Parser(prog="python -m train.compile",
                    description="Compiles the train step of CONFIG with overrides for a TPU topology "
                                "on this host (no TPU needed) and reports HBM per chip, FLOPs per "
                                "step and a roofline estimate. Needs libtpu: pip install -e \".[tpu]\".",
                    epilog=config_keys_help())
    parser.add_argument("--topology",
                        help="CHIP:TOPOLOGY as jax.experimental.topologies takes it, e.g. v5e:2x2, "
                             "v5e:4x4, v5p:4x4x4, v6e:8x8")
    add_config_arguments(parser)
    add_json_argument(parser, "the report as one JSON object")
    return parser


def prepare_environment() -> None:
    """Before JAX starts its backends: run JAX on the host CPU (the TPU topology is compile-only, so
    an attached TPU is neither needed nor touched), skip libtpu's metadata-server queries, let
    libtpu load beside another process that holds it, and give it the host facts it otherwise warns
    about (they do not change what is compiled for the named topology)."""
    jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")


def libtpu_installed() -> bool:
    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):
        return False


def size(n: float) -> str:
    """Bytes as GiB, or MiB below a tenth of a GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.2f} MiB"


def count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def format_report(r: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    chip, mem, fl, roof, model, b = (r["chip"], r["memory_per_chip"], r["flops"], r["roofline"],
                                      r["model"], r["batch"])
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    moe = (f", MoE {model['moe_impl']} ({count(model['active_params'])} active)"
           if model["moe_impl"] else "")
    share = r["devices"] // r["chips"]
    per_chip = "" if share == 1 else f" ({share} devices per chip)"
    rows = [("arguments", mem["arguments"], f"train state {size(r['state_bytes_per_device'] * share)}"),
            ("outputs", mem["outputs"], f"{size(mem['aliased'])} of it in donated arguments"),
            ("temporaries", mem["temporaries"], ""),
            ("code", mem["code"], ""),
            ("total", mem["total"], f"{r['hbm_fraction']:.1%} of HBM"
             + ("" if r["fits"] else ": DOES NOT FIT"))]
    return "\n".join([
        f"{r['config']} on {r['topology']}: {r['chips']} x {chip['kind']}{per_chip}, mesh {mesh}",
        f"model: {count(model['params'])} parameters{moe}, {model['param_dtype']} params, "
        f"{model['dtype']} compute, remat {model['remat']}; batch {b['batch_size']} x {b['seq_len']} = "
        f"{b['tokens_per_step']:,} tokens/step, {b['microbatches']} microbatch(es)",
        f"compiled in {r['compile_s']:.1f} s (+ {r['cost_compile_s']:.1f} s for the cost programs)",
        f"HBM per chip ({chip['name']}: {size(r['hbm_per_chip'])}):",
        *(f"  {name:<12} {size(value):>12}" + (f"  ({note})" if note else "")
          for name, value, note in rows),
        f"FLOPs per step: compiled {fl['compiled_per_step']:.4g} ({fl['compiled_per_device']:.4g} per "
        f"device); model/flops.py {fl['formula_per_step']:.4g} (ratio {fl['ratio']:.3f}); with "
        f"remat recompute and capacity padding {fl['executed_per_step']:.4g} (ratio "
        f"{fl['executed_ratio']:.3f})",
        f"HBM traffic per device per step: {r['bytes_accessed_per_device']:.4g} bytes",
        f"roofline ({chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
        f"{chip['hbm_bandwidth'] / 1e9:.0f} GB/s HBM per chip; ICI collectives not modelled):",
        f"  compute {seconds(roof['compute_s'])}, HBM {seconds(roof['memory_s'])} -> step "
        f"{seconds(roof['step_s'])} ({roof['bound']}-bound), {roof['tokens_per_s']:,.0f} tokens/s, "
        f"MFU {roof['mfu']:.1%}",
    ])


def compile_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if not args.topology:
        raise UsageError("--topology is required, e.g. --topology v5e:2x2")
    if not libtpu_installed():
        raise UsageError('libtpu is not installed; install the TPU extra: pip install -e ".[tpu]"')
    prepare_environment()
    cfg = config_of(args)
    report = compile_report(cfg, args.topology, config_arguments(args)[0] or "configs/default.yaml")
    print(json.dumps(report, indent=2) if args.json else format_report(report), flush=True)
    check_fits(report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.compile``: exit 2 with one ``error:`` line for a bad argument or config,
    an unknown topology, a missing libtpu, or a config that does not fit in HBM (the report is
    still printed on stdout in that last case)."""
    return run(compile_command, argv)


if __name__ == "__main__":
    sys.exit(main())
