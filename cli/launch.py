"""``python -m train.launch --processes N [CONFIG.yaml] [overrides]``: runs one training job as N
local processes joined by ``jax.distributed`` (a coordinator on localhost, gloo collectives between
processes), each emulating ``run.cpu_devices / N`` CPU devices. This is how multi-host behaviour is
tested on one machine; on a real pod, start ``python -m train ... run.distributed=true`` once per
host instead.

Process 0's output is shown; the others' goes to ``RUN_DIR/logs/process_I.log`` (for a run on an
object store, to a local directory the launcher names: a process's output needs a file). If any process
fails, the others are stopped and the launcher exits with its code. A SIGTERM to the launcher is
passed on to every process (a preemption: they save and exit 0).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cli.args import Parser, run
from cli.config_args import add_config_arguments, config_arguments, config_keys_help, config_of
from core.errors import ConfigError
from train.run_dir import RunDir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_parser() -> Parser:
    parser = Parser(prog="python -m train.launch",
                    description="Runs one training job as N local jax.distributed processes.",
                    epilog=config_keys_help())
    parser.add_argument("--processes", type=int, required=True, help="processes to start")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds the other processes get to stop after one fails")
    add_config_arguments(parser)
    return parser


def launch_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    cfg = config_of(args)
    if args.processes < 1 or cfg.run.cpu_devices % args.processes:
        raise ConfigError("--processes", f"{args.processes} processes cannot share "
                          f"run.cpu_devices={cfg.run.cpu_devices} devices evenly")
    path, overrides = config_arguments(args)
    coordinator = f"127.0.0.1:{free_port()}"
    run = RunDir(cfg.run.dir)
    logs = Path(tempfile.mkdtemp(prefix="meshlm-logs-")) if run.remote else run.logs
    logs.mkdir(parents=True, exist_ok=True)
    if run.remote and args.processes > 1:
        print(f"meshlm: the output of processes 1-{args.processes - 1} goes to {logs}", flush=True)
    procs = []
    for i in range(args.processes):
        cmd = [sys.executable, "-m", "train", *([path] if path else []), *overrides,
               "run.distributed=true", f"run.coordinator={coordinator}",
               f"run.num_processes={args.processes}", f"run.process_id={i}",
               f"run.cpu_devices={cfg.run.cpu_devices // args.processes}"]
        out = None if i == 0 else (logs / f"process_{i}.log").open("w")
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None))

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)
    signal.signal(signal.SIGTERM, forward)
    return wait_all(procs, args.grace)


def main(argv: Sequence[str] | None = None) -> int:
    return run(launch_command, argv)


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
