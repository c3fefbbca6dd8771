"""Converting checkpoints (``convert/checkpoints.py``):

    python -m convert import SRC RUN_DIR [--seq-len N] [--dtype float32|bfloat16]
    python -m convert export RUN_DIR OUT_DIR [--dtype float32|bfloat16]

Bad input (unknown architecture, missing or misshapen tensors, an unsupported GGUF quantisation,
an existing RUN_DIR or OUT_DIR) is one ``error:`` line and exit 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from cli.args import Parser, run, subcommands
from cli.host import quiet_tpu_probe
from convert.checkpoints import MAX_WINDOW, export_checkpoint, import_checkpoint

DTYPES = ("float32", "bfloat16")


def build_parser() -> Parser:
    parser = Parser(prog="python -m convert",
                    description="Hugging Face and GGUF checkpoints into meshlm run directories, and back.")
    sub = subcommands(parser)
    imp = sub.add_parser("import", help="Hugging Face directory or GGUF file -> meshlm run dir")
    imp.add_argument("src", type=Path, help="a Hugging Face model directory or a .gguf file")
    imp.add_argument("run_dir", type=Path, help="the new meshlm run directory")
    imp.add_argument("--seq-len", type=int, default=0,
                     help=f"generation window / fine-tuning length (default: min(context, {MAX_WINDOW}))")
    imp.add_argument("--dtype", choices=DTYPES, default="float32",
                     help="parameter and compute dtype of the run (default float32)")
    exp = sub.add_parser("export", help="meshlm run dir -> Hugging Face directory")
    exp.add_argument("run_dir", type=Path, help="a meshlm run directory or one checkpoints/<step>")
    exp.add_argument("out_dir", type=Path, help="the new Hugging Face model directory")
    exp.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written tensors")
    return parser


def convert_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    quiet_tpu_probe()
    if args.command == "import":
        out = import_checkpoint(args.src, args.run_dir, seq_len=args.seq_len, dtype=args.dtype)
        print(f"imported {args.src} -> {out}")
    else:
        out = export_checkpoint(args.run_dir, args.out_dir, dtype=args.dtype)
        print(f"exported {args.run_dir} -> {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(convert_command, argv, errors=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
