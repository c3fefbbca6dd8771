"""Fine-tuning commands:

    python -m train.finetune [CONFIG] [section.key=value ...]   (default configs/finetune_lora.yaml)
    python -m train.finetune merge ADAPTER_RUN OUT_RUN

The first trains like ``python -m train`` but requires ``finetune.base`` and takes the model and the
tokenizer from that run; ``merge`` writes a plain run directory whose checkpoint holds the base
weights with the LoRA adapters added in (for ``python -m eval``, export and further fine-tuning).
Mistakes print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from cli.args import Parser, run
from cli.config_args import add_config_arguments, config_keys_help
from cli.host import quiet_tpu_probe, setup_devices
from cli.train import run_training, train_command
from train.merge import merge_run
from train.run_dir import RunDir

EXAMPLES = """examples:
  python -m train.finetune finetune.base=runs/tiny data.source=text:notes/*.txt run.dir=runs/ft
  python -m train.finetune configs/finetune_full.yaml finetune.base=runs/moe finetune.freeze_router=true
  python -m train.finetune merge runs/ft runs/ft_merged"""


def build_parser() -> Parser:
    parser = Parser(prog="python -m train.finetune",
                    description="Fine-tunes finetune.base=RUN_DIR (LoRA or full); `merge ADAPTER_RUN "
                                "OUT_RUN` merges LoRA adapters into the weights.",
                    epilog=f"{EXAMPLES}\n\n{config_keys_help()}")
    add_config_arguments(parser, default="configs/finetune_lora.yaml")
    return parser


def merge_command(argv: Sequence[str]) -> int:
    parser = Parser(prog="python -m train.finetune merge",
                    description="Writes OUT_RUN: the adapter run's base weights with its LoRA "
                                "adapters merged in (a plain run for eval, export, fine-tuning).")
    parser.add_argument("adapter_run", metavar="ADAPTER_RUN", help="a LoRA fine-tune's run directory")
    parser.add_argument("out_run", metavar="OUT_RUN", help="the new run directory")
    args = parser.parse_args(argv)
    quiet_tpu_probe()
    cfg = RunDir(Path(args.adapter_run).resolve()).read_config()
    setup_devices(dataclasses.replace(cfg.run, distributed=False))
    summary = merge_run(args.adapter_run, args.out_run)
    print(f"meshlm: merged the adapters of {args.adapter_run} (step {summary['step']}) into "
          f"{summary['base_run']} step {summary['base_step']}: {summary['out_run']}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.finetune``: fine-tuning, or ``merge``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "merge":
        return run(lambda a: merge_command(a[1:]), argv)
    return run_training(
        lambda a: train_command(build_parser().parse_intermixed_args(a), finetune=True), argv)


if __name__ == "__main__":
    sys.exit(main())
