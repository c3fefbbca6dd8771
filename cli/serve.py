"""``python -m eval serve --checkpoint RUN [--host] [--port] [--max-batch] [--max-seq-len] ...``: an
OpenAI-compatible HTTP server (inference/server.py) over the serving engine, run by uvicorn.

The engine compiles all its programs before the socket opens; then one line, ``serving MODEL on
http://HOST:PORT``, goes to stdout (``--port 0`` picks a free port and says which). SIGTERM (or
Ctrl-C) stops accepting connections, lets every request in flight finish (or, past
``--shutdown-timeout`` seconds, cancels those still running: a response not yet started gets a
500, a stream is cut off), stops the engine and exits 0 (130 for Ctrl-C). Mistakes (bad
arguments, a missing checkpoint, a port in use) print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from cli.args import Parser, add_checkpoint_argument, run
from cli.host import load_checkpoint, quiet_tpu_probe
from core.errors import INTERRUPTED_EXIT, UsageError
from inference.engine import DEFAULT_BLOCK_SIZE, Engine
from inference.load import read_run_config
from inference.server import make_app


def build_parser() -> Parser:
    parser = Parser(prog="python -m eval serve",
                    description="Serve a meshlm checkpoint over an OpenAI-compatible HTTP API: "
                                "/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.")
    add_checkpoint_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000, help="0 = any free port (printed)")
    parser.add_argument("--model-name", help="the model's name in the API (default: the run "
                        "directory's name)")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait for a batch slot; past them: HTTP 429")
    parser.add_argument("--max-seq-len", type=int, default=0, help="context window, a multiple of "
                        "--block-size (default: the model's, rounded down to one)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help="tokens per KV-cache block")
    parser.add_argument("--kv-blocks", type=int, default=0,
                        help="KV-cache blocks (default: a full window for every batch slot)")
    parser.add_argument("--prefill-chunk", type=int, default=128,
                        help="prompt tokens prefilled per engine step")
    parser.add_argument("--shutdown-timeout", type=float, default=0,
                        help="seconds SIGTERM waits for the requests in flight before cancelling "
                        "the rest (0 = wait for all)")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    return parser


def check_args(args: argparse.Namespace) -> None:
    for name in ("max_batch", "block_size", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("max_queue", "max_seq_len", "kv_blocks", "shutdown_timeout"):
        if not getattr(args, name) >= 0:  # NaN too
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    if math.isinf(args.shutdown_timeout):
        raise UsageError("--shutdown-timeout must be finite (0 waits for every request)")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")


def uvicorn_config(app: ASGIApp, args: argparse.Namespace, **overrides: Any) -> uvicorn.Config:
    """uvicorn's settings from the arguments: ``--shutdown-timeout`` 0 waits for every request."""
    settings = {"log_level": args.log_level, "access_log": False,
                "timeout_graceful_shutdown": args.shutdown_timeout or None}
    return uvicorn.Config(app, **(settings | overrides))


def listen(host: str, port: int) -> socket.socket:
    """A bound socket (uvicorn listens on it); UsageError when the address cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, except that after a graceful shutdown on SIGTERM or SIGINT the process
    exits by our return code (uvicorn raises the signal again, which would end it by the signal)."""

    signal_received: int | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        def on_signal(sig: int, frame: object) -> None:
            self.signal_received = self.signal_received or sig
            self.handle_exit(sig, None)  # graceful; a second Ctrl-C forces the exit

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    window = read_run_config(args.checkpoint).model.max_seq_len
    max_seq_len = args.max_seq_len or window - window % args.block_size
    if not args.block_size <= max_seq_len <= window or max_seq_len % args.block_size:
        raise UsageError(f"--max-seq-len must be a multiple of --block-size ({args.block_size}) "
                         f"in [{args.block_size}, {window}] (the model's window), got {max_seq_len}")
    sock = listen(args.host, args.port)  # before the slow part: a port in use fails at once
    loaded = load_checkpoint(args.checkpoint)
    engine = Engine(loaded.cfg.model, loaded.params, loaded.mesh, loaded.rules,
                    max_batch=args.max_batch, max_seq_len=max_seq_len, block_size=args.block_size,
                    num_blocks=args.kv_blocks or None, prefill_chunk=args.prefill_chunk)
    engine.warm_up()
    name = args.model_name or loaded.run_dir.name
    app = make_app(engine, loaded.tokenizer, name, max_queue=args.max_queue)
    server = _Server(uvicorn_config(app, args))
    host, port = sock.getsockname()[:2]
    print(f"serving {name} on http://{host}:{port}", flush=True)
    server.run(sockets=[sock])
    return INTERRUPTED_EXIT if server.signal_received == signal.SIGINT else 0


def main(argv: Sequence[str] | None = None) -> int:
    quiet_tpu_probe()  # before JAX starts its backends
    return run(serve_command, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
