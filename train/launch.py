"""``python -m train.launch --processes N [CONFIG.yaml] [overrides]``: runs one training job as N
local processes joined by ``jax.distributed`` (a coordinator on localhost, gloo collectives between
processes), each emulating ``run.cpu_devices / N`` CPU devices. This is how multi-host behaviour is
tested on one machine; on a real pod, start ``python -m train ... run.distributed=true`` once per
host instead.

Process 0's output is shown; the others' goes to ``RUN_DIR/logs/process_I.log``. If any process
fails, the others are stopped and the launcher exits with its code. A SIGTERM to the launcher is
passed on to every process (a preemption: they save and exit 0).
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.launch")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds the other processes get to stop after one fails")
    args, rest = parser.parse_known_args(argv)
    from train.__main__ import parse_args
    from train.config import ConfigError, load_config, one_line

    try:
        path, overrides = parse_args(rest)
        cfg = load_config(path, overrides)
        if args.processes < 1 or cfg.run.cpu_devices % args.processes:
            raise ConfigError("--processes", f"{args.processes} processes cannot share "
                              f"run.cpu_devices={cfg.run.cpu_devices} devices evenly")
    except ConfigError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    coordinator = f"127.0.0.1:{free_port()}"
    logs = Path(cfg.run.dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(args.processes):
        cmd = [sys.executable, "-m", "train", *rest, "run.distributed=true",
               f"run.coordinator={coordinator}", f"run.num_processes={args.processes}",
               f"run.process_id={i}", f"run.cpu_devices={cfg.run.cpu_devices // args.processes}"]
        out = None if i == 0 else (logs / f"process_{i}.log").open("w")
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None))

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)
    signal.signal(signal.SIGTERM, forward)
    return wait_all(procs, args.grace)


def wait_all(procs: list[subprocess.Popen], grace: float) -> int:
    """Waits for every process; once one fails, the rest get ``grace`` seconds, then are killed."""
    failed_at = None
    code = 0
    while any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            if p.returncode not in (None, 0) and failed_at is None:
                print(f"error: process {i} exited with code {p.returncode}; stopping the others",
                      file=sys.stderr)
                failed_at, code = time.monotonic(), p.returncode
                for other in procs:
                    if other.poll() is None:
                        other.terminate()
        if failed_at is not None and time.monotonic() - failed_at > grace:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    return code or next((p.returncode for p in procs if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
