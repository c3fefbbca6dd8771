"""Converting checkpoints (``convert/checkpoints.py``):

    python -m convert import SRC RUN_DIR [section.key=value ...] [--seq-len N] [--dtype D]
    python -m convert export RUN_DIR OUT_DIR [mesh.key=value ...] [--dtype D] [--shard-size 5GB]

``import`` streams the tensors of a Hugging Face directory (sharded safetensors through their
index) or a GGUF file one at a time onto the run's mesh (by default every parameter split over all
devices; ``mesh.*`` overrides choose another, ``run.cpu_devices`` how many CPU devices to emulate)
and keeps the stored dtype unless ``--dtype`` says otherwise. ``export`` gathers one tensor at a
time into sharded safetensors files of at most ``--shard-size`` bytes with an index, in the run's
parameter dtype unless ``--dtype`` says otherwise.

Bad input (unknown architecture, missing or misshapen tensors, an unsupported GGUF quantisation,
an existing RUN_DIR or OUT_DIR, a bad size or override) is one ``error:`` line and exit 2; nothing
is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from cli.args import Parser, run, subcommands
from cli.host import quiet_tpu_probe, use_cpu_devices
from convert.checkpoints import (
    DEFAULT_SHARD_SIZE,
    MAX_WINDOW,
    PARAMETERS_SPLIT,
    RUN_DTYPES,
    plan_import,
    write_import,
)
from convert.export import export_checkpoint
from convert.safetensors_io import parse_size
from core.errors import ConfigError
from inference.load import read_run_config
from sharding.mesh import MeshConfig
from train.config import build_config, parse_override

EXAMPLES = """examples:
  python -m convert import ~/hf/Llama-3.2-1B runs/llama1b mesh.fsdp=4 mesh.tensor=2
  python -m convert export runs/llama1b ~/hf/llama1b-out --shard-size 2GB --dtype bfloat16"""


def shard_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> Parser:
    parser = Parser(prog="python -m convert", epilog=EXAMPLES,
                    description="Hugging Face and GGUF checkpoints into meshlm run directories, and back.")
    sub = subcommands(parser)
    imp = sub.add_parser("import", help="Hugging Face directory or GGUF file -> meshlm run dir")
    imp.add_argument("src", type=Path, help="a Hugging Face model directory or a .gguf file")
    imp.add_argument("run_dir", type=Path, help="the new meshlm run directory")
    imp.add_argument("overrides", nargs="*", metavar="section.key=value",
                     help="keys of the new run's config, e.g. mesh.fsdp=4 mesh.tensor=2 "
                          "run.cpu_devices=8 (default: every parameter split over all devices)")
    imp.add_argument("--seq-len", type=int, default=0,
                     help=f"generation window / fine-tuning length (default: min(context, {MAX_WINDOW}))")
    imp.add_argument("--dtype", choices=RUN_DTYPES, default="",
                     help="parameter and compute dtype of the run (default: the checkpoint's stored "
                          "dtype; float16 becomes float32)")
    exp = sub.add_parser("export", help="meshlm run dir -> Hugging Face directory")
    exp.add_argument("run_dir", type=Path, help="a meshlm run directory or one checkpoints/<step>")
    exp.add_argument("out_dir", type=Path, help="the new Hugging Face model directory")
    exp.add_argument("overrides", nargs="*", metavar="mesh.key=value",
                     help="the mesh the parameters are restored onto while exporting, and "
                          "run.cpu_devices (default: every parameter split over all devices)")
    exp.add_argument("--dtype", choices=RUN_DTYPES, default="",
                     help="dtype of the written tensors (default: the run's param_dtype)")
    exp.add_argument("--shard-size", type=shard_size, default=DEFAULT_SHARD_SIZE,
                     help="largest safetensors file, e.g. 5GB, 500MB, 2GiB or 1e9 bytes; a larger "
                          "tensor gets a file of its own (default 5GB)")
    return parser


def export_setup(run_dir: Path, overrides: Sequence[str]) -> MeshConfig:
    """The MeshConfig an export restores onto, after emulating the CPU devices it needs."""
    for text in overrides:
        section, key, _ = parse_override(text)
        if section != "mesh" and f"{section}.{key}" != "run.cpu_devices":
            raise ConfigError(f"{section}.{key}", "an export takes only mesh.* and run.cpu_devices")
    cfg = build_config({"mesh": dataclasses.asdict(PARAMETERS_SPLIT),
                        "run": {"cpu_devices": read_run_config(run_dir).run.cpu_devices}}, overrides)
    use_cpu_devices(cfg.run.cpu_devices, unless_started=True)
    return cfg.mesh


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments; overrides may come before or after the flags."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    for text in extra:
        if text.startswith("-") or "=" not in text:
            parser.error(f"unrecognized argument {text!r}")
        args.overrides.append(text)
    return args


def convert_command(argv: Sequence[str]) -> int:
    args = parse(argv)
    quiet_tpu_probe()
    if args.command == "import":
        plan = plan_import(args.src, args.run_dir, seq_len=args.seq_len, dtype=args.dtype,
                           overrides=args.overrides)
        use_cpu_devices(plan.cfg.run.cpu_devices, unless_started=True)
        out = write_import(plan)
        print(f"imported {args.src} -> {out}")
    else:
        mesh = export_setup(args.run_dir, args.overrides)
        out = export_checkpoint(args.run_dir, args.out_dir, dtype=args.dtype,
                                shard_size=args.shard_size, mesh=mesh)
        print(f"exported {args.run_dir} -> {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(convert_command, argv, errors=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())

