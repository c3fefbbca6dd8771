"""``python -m train [CONFIG.yaml] [section.key=value ...]`` (also ``meshlm-train``): the training CLI.

Bad configuration prints one ``error:`` line and exits 2, before anything compiles. A run that
fails (full disk, non-finite divergence, a coordinator that never answers, a peer process that
died) prints one ``error:`` line and exits 1; SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

import os
import sys
import threading
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
    from train.config import RunError

    jax.config.update("jax_num_cpu_devices", run.cpu_devices)
    if run.distributed:
        where = f"the coordinator at {run.coordinator}" if run.coordinator else "the cluster"
        message = (f"error: could not join {where} within run.init_timeout={run.init_timeout} s "
                   "(is process 0 running and reachable, and did every process start?)")
        # JAX aborts the process with a C++ stack trace when joining times out: say it first.
        watchdog = threading.Timer(max(run.init_timeout - 1.0, 0.9 * run.init_timeout),
                                   lambda: (print(message, file=sys.stderr), _exit_now(1)))
        watchdog.daemon = True
        watchdog.start()
        try:
            initialize_distributed(run.coordinator, run.num_processes, run.process_id,
                                   run.init_timeout, run.heartbeat_timeout)
        except Exception as e:  # noqa: BLE001 -- refusals come as several types
            raise RunError(f"{message[len('error: '):]}: {_first_line(e)}") from None
        finally:
            watchdog.cancel()
    return jax.device_count()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _exit_now(code: int) -> None:
    """Leaves without JAX's distributed shutdown, whose barrier would wait for a dead peer."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None, *, finetune: bool = False) -> int:
    """The CLI; ``finetune=True`` is ``python -m train.finetune`` (finetune.base required)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from sharding.host import quiet_tpu_probe

    quiet_tpu_probe()  # before JAX loads
    from train.config import ConfigError, RunError, one_line, validate, validate_run
    from train.finetune import load_run_config

    try:
        path, overrides = parse_args(argv)
        cfg = load_run_config(path, overrides, finetune=finetune)  # finetune.base: from that run
        validate_run(cfg.run)  # before JAX starts: a bad coordinator setting must not hang
        validate(cfg, setup_devices(cfg.run))
        from train.loop import train

        train(cfg)
    except ConfigError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        import jax

        if jax.process_count() > 1:  # peers may wait in a collective: end now, they follow
            _exit_now(1)
        return 1
    except Exception as e:
        import jax

        if jax.process_count() > 1 and isinstance(e, jax.errors.JaxRuntimeError):
            print(f"error: process {jax.process_index()} lost contact with another process "
                  f"(it probably died; see its log): {_first_line(e)}", file=sys.stderr)
            _exit_now(1)
        raise
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
