"""``python -m train [CONFIG.yaml] [section.key=value ...]`` (also ``meshlm-train``): the training CLI.

Bad configuration prints one ``error:`` line and exits 2, before anything compiles.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from train.config import RunConfig

USAGE = """usage: python -m train [CONFIG.yaml] [section.key=value ...]

Trains (or resumes) the run described by CONFIG (default: configs/default.yaml) with overrides,
e.g. train.steps=200 run.dir=runs/small mesh.data=2 mesh.fsdp=2 mesh.tensor=2."""


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    if argv and "=" not in argv[0]:
        return argv[0], argv[1:]
    return None, argv


def setup_devices(run: RunConfig) -> int:
    """Joins the multi-process runtime if asked and emulates CPU devices; returns the global
    device count."""
    import jax

    from sharding.mesh import initialize_distributed

    jax.config.update("jax_num_cpu_devices", run.cpu_devices)
    if run.distributed:
        initialize_distributed(run.coordinator, run.num_processes, run.process_id)
    return jax.device_count()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from train.config import ConfigError, load_config, validate, validate_run

    try:
        path, overrides = parse_args(argv)
        cfg = load_config(path, overrides)
        validate_run(cfg.run)  # before JAX starts: a bad coordinator setting must not hang
        validate(cfg, setup_devices(cfg.run))
        from train.loop import train

        train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
