"""``python -m train.compile --topology NAME [--slices N] [CONFIG.yaml] [section.key=value ...]
[--json]``: compiles the real train step ahead of time for a TPU topology (or N slices of it joined
by the data-center network) on any host (libtpu, no TPU needed) and reports HBM per chip, FLOPs per
step, the bytes each device sends in collectives (and those that cross slices), the Pallas kernels
the program calls, and a roofline estimate of step time and MFU with and without overlap of
collectives.

Exit 2 with one ``error:`` line for a bad argument or config, an unknown topology, a missing libtpu,
or a config that does not fit in HBM, naming its largest memory term (the report is still printed on
stdout when the program compiled).
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
                                "on this host (no TPU needed) and reports HBM per chip, FLOPs and "
                                "collective bytes per step, the Pallas kernels called and a roofline "
                                "estimate. Needs libtpu: pip install -e \".[tpu]\".",
                    epilog=config_keys_help())
    parser.add_argument("--topology",
                        help="CHIP:TOPOLOGY as jax.experimental.topologies takes it, e.g. v5e:2x2, "
                             "v5e:4x4, v5p:4x4x4, v6e:8x8")
    parser.add_argument("--slices", type=int, default=1,
                        help="compile for this many slices of the topology, joined by the "
                             "data-center network (multislice; split data or fsdp across them with "
                             "mesh.dcn_data / mesh.dcn_fsdp); the report adds the bytes that cross "
                             "it (default 1)")
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


def memory_lines(r: dict[str, Any]) -> list[str]:
    chip, mem = r["chip"], r["memory_per_chip"]
    share = r["devices"] // r["chips"]
    rows = [("arguments", mem["arguments"], f"train state {size(r['state_bytes_per_device'] * share)}"),
            ("outputs", mem["outputs"], f"{size(mem['aliased'])} of it in donated arguments"),
            ("temporaries", mem["temporaries"], ""),
            ("code", mem["code"], ""),
            ("total", mem["total"], f"{r['hbm_fraction']:.1%} of HBM"
             + ("" if r["fits"] else ": DOES NOT FIT"))]
    lines = [f"HBM per chip ({chip['name']}: {size(r['hbm_per_chip'])}):",
             *(f"  {name:<12} {size(value):>12}" + (f"  ({note})" if note else "")
               for name, value, note in rows)]
    if r["largest_buffers"]:
        lines.append("  largest buffers: " + ", ".join(
            f"{b['largest_array']} ({size(b['bytes'])})" for b in r["largest_buffers"]))
    return lines


def flop_lines(fl: dict[str, Any]) -> list[str]:
    kernel = (f" + {fl['kernel_estimate_per_step']:.4g} estimated in attention kernels that XLA does "
              f"not count = {fl['counted_per_step']:.4g}" if fl["kernel_estimate_per_step"] else "")
    lines = [f"FLOPs per step: compiled {fl['compiled_per_step']:.4g} ({fl['compiled_per_device']:.4g} "
             f"per device){kernel}; model/flops.py {fl['formula_per_step']:.4g} (ratio "
             f"{fl['ratio']:.3f}); with remat recompute and capacity padding "
             f"{fl['executed_per_step']:.4g} (ratio {fl['executed_ratio']:.3f})"]
    if fl["loops_counted_once"]:
        lines.append(f"  UNDERCOUNTED: {fl['loops_counted_once']} loop(s) in the cost programs, whose "
                     "bodies XLA counts once (FLOPs and HBM traffic are too low)")
    if fl["uncounted_kernels"]:
        lines.append(f"  FLOPs not counted (kernels without a cost estimate): "
                     f"{', '.join(fl['uncounted_kernels'])}")
    return lines


def collective_lines(r: dict[str, Any]) -> list[str]:
    c = r["collectives"]
    kinds = [f"{kind} {size(b)} ({c['ops_per_step'][kind]:.0f} ops)"
             for kind, b in c["bytes_per_device"].items() if b]
    unrolled = sum(c["unrolled_bytes_per_device"].values())
    lines = [f"collectives, bytes sent per device per step (ring model): "
             f"{', '.join(kinds) or 'none'}; total {size(c['total_bytes_per_device'])} "
             f"(unrolled cost programs, microbatches folded: {size(unrolled)})"]
    if "dcn" in c:
        dcn = c["dcn"]
        crossing = [f"{kind} {size(b)} ({dcn['ops_per_step'][kind]:.0f} ops)"
                    for kind, b in dcn["bytes_per_device"].items() if b]
        unread = (f"; {dcn['groups_not_read']} collective(s) whose groups were not read counted "
                  "as crossing" if dcn["groups_not_read"] else "")
        lines.append(f"  across slices (data-center network), collectives whose groups span "
                     f"slices: {', '.join(crossing) or 'none'}; total "
                     f"{size(dcn['total_bytes_per_device'])} per device per step{unread}")
    if c["unknown_trip_count_loops"]:
        lines.append(f"  counted once, trip count unknown: {', '.join(c['unknown_trip_count_loops'])}")
    k = r["kernels"]
    pallas = ", ".join(f"{name} x{v['calls']:.0f}" + ("" if v["cost_estimate"] else " (no cost estimate)")
                       for name, v in k["pallas"].items()) or "none"
    dots = k["attention_xla_dots"]
    attention = (f"yes, {sum(dots.values()):.0f} matmuls per step ({', '.join(dots)})" if dots
                 else "no")
    lines.append(f"kernels (Pallas calls per step): {pallas}; attention as XLA dots: {attention}")
    return lines


def roofline_lines(r: dict[str, Any]) -> list[str]:
    chip, roof = r["chip"], r["roofline"]
    ici = (f"{chip['ici_bandwidth'] / 1e9:.0f} GB/s ICI (bidirectional, all links)"
           if chip["ici_bandwidth"] else f"ICI not modelled: {chip['ici_source']}")
    head = (f"roofline estimate ({chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
            f"{chip['hbm_bandwidth'] / 1e9:.0f} GB/s HBM, {ici} per chip):")
    terms = f"  compute {seconds(roof['compute_s'])}, HBM {seconds(roof['memory_s'])}"
    if roof["ici_s"] is not None:
        terms += f", ICI {seconds(roof['ici_s'])} (a lower bound)"

    def line(label: str, t: dict[str, float]) -> str:
        return (f"  {label}: step {seconds(t['step_s'])}, {t['tokens_per_s']:,.0f} tokens/s, "
                f"MFU {t['mfu']:.1%} (causal attention; {t['mfu_full_attention']:.1%} counting all "
                f"T keys, as training logs)")

    lines = [head, terms, line(f"overlapped, max of the three ({roof['bound']}-bound)",
                               roof["overlapped"])]
    if roof["serial"] is not None:
        lines.append(line("not overlapped, max(compute, HBM) + ICI", roof["serial"]))
    return lines


def format_report(r: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    chip, fl, model, b = r["chip"], r["flops"], r["model"], r["batch"]
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    moe = (f", MoE {model['moe_impl']} ({count(model['active_params'])} active)"
           if model["moe_impl"] else "")
    share = r["devices"] // r["chips"]
    per_chip = "" if share == 1 else f" ({share} devices per chip)"
    return "\n".join([
        f"{r['config']} on {r['topology']}: {r['chips']} x {chip['kind']}{per_chip}, mesh {mesh}",
        f"model: {count(model['params'])} parameters{moe}, {model['param_dtype']} params, "
        f"{model['dtype']} compute, remat {model['remat']}, attention {model['attention_impl']}; "
        f"batch {b['batch_size']} x {b['seq_len']} = {b['tokens_per_step']:,} tokens/step, "
        f"{b['microbatches']} microbatch(es)",
        f"compiled in {r['compile_s']:.1f} s (+ {r['cost_compile_s']:.1f} s for the cost programs)",
        *memory_lines(r),
        *flop_lines(fl),
        f"HBM traffic per device per step: {r['bytes_accessed_per_device']:.4g} bytes",
        *collective_lines(r),
        *roofline_lines(r),
    ])


def compile_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if not args.topology:
        raise UsageError("--topology is required, e.g. --topology v5e:2x2")
    if not libtpu_installed():
        raise UsageError('libtpu is not installed; install the TPU extra: pip install -e ".[tpu]"')
    prepare_environment()
    cfg = config_of(args)
    report = compile_report(cfg, args.topology, config_arguments(args)[0] or "configs/default.yaml",
                            args.slices)
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
