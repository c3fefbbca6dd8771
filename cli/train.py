"""``python -m train [CONFIG] [section.key=value ...]`` (also ``meshlm-train``): trains or resumes
the run CONFIG and the overrides describe (it fine-tunes too when ``finetune.base`` is set; see also
``cli/finetune.py``).

Bad configuration prints one ``error:`` line and exits 2 before anything compiles; a run that fails
(full disk, non-finite divergence, a coordinator that never answers, a peer process that died)
prints one ``error:`` line and exits 1; SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import jax

from cli.args import Parser, run
from cli.config_args import add_config_arguments, config_keys_help, config_of
from cli.host import exit_now, quiet_tpu_probe, setup_devices
from core.errors import ConfigError, RunError, UsageError, first_line, report
from inference.generate import print_sample
from train.loop import train, write_expert_load_picture
from train.validate import validate, validate_run

EXAMPLES = """examples:
  python -m train configs/tiny.yaml train.steps=200 run.dir=runs/small
  python -m train mesh.data=2 mesh.fsdp=2 mesh.tensor=2 model.num_kv_heads=2"""


def build_parser() -> Parser:
    parser = Parser(prog="python -m train",
                    description="Trains (or resumes) the run described by CONFIG and overrides.",
                    epilog=f"{EXAMPLES}\n\n{config_keys_help()}")
    add_config_arguments(parser)
    return parser


def train_command(args: argparse.Namespace, *, finetune: bool = False) -> int:
    """Validates (before JAX starts any device work) and trains; ``finetune`` requires
    ``finetune.base``."""
    quiet_tpu_probe()
    cfg = config_of(args, finetune=finetune)  # finetune.base: model and tokenizer from that run
    validate_run(cfg.run)  # before JAX starts: a bad coordinator setting must not hang
    validate(cfg, setup_devices(cfg.run))
    train(cfg, hooks=(write_expert_load_picture, print_sample))
    return 0


def run_training(command: Callable[[Sequence[str]], int], argv: Sequence[str] | None) -> int:
    """Runs a training command: configuration mistakes are one line and exit 2, a failed run one
    line and exit 1; with several processes a failure ends this one at once (its peers may wait in
    a collective for it)."""
    try:
        return run(command, argv, errors=(ConfigError, UsageError))
    except RunError as e:
        code = report(e)
        if jax.process_count() > 1:
            exit_now(code)
        return code
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() > 1:
            print(f"error: process {jax.process_index()} lost contact with another process "
                  f"(it probably died; see its log): {first_line(e)}", file=sys.stderr)
            exit_now(1)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    return run_training(lambda a: train_command(build_parser().parse_intermixed_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
