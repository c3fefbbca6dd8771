"""One command-line style for every command: argparse through ``Parser`` (a mistake is one
``error:`` line and exit 2, never a usage dump), the same flag names for the same things, and ``run``
mapping the errors a user can cause to their one line and exit code (``core/errors.py``). Commands
that take a config add ``CONFIG [section.key=value ...]`` with ``cli/config_args.py``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from core.errors import RunError, UsageError, report


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes raise UsageError (one ``error:`` line, exit 2) instead of printing
    the usage and exiting."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        raise UsageError(message)


def subcommands(parser: argparse.ArgumentParser) -> Any:
    """The parser's subcommands (each a ``Parser``; one is required)."""
    return parser.add_subparsers(dest="command", required=True, parser_class=Parser)


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoints/<step>")


def add_json_argument(parser: argparse.ArgumentParser, what: str = "one JSON object") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} instead of text")


def run(command: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None,
        errors: tuple[type[BaseException], ...] = (ValueError, RunError)) -> int:
    """Runs ``command(argv)`` (default: this process's arguments); the ``errors`` a user can cause,
    and an interrupt, become one ``error:`` line and their exit code. Anything else is a bug and
    keeps its traceback."""
    try:
        return command(sys.argv[1:] if argv is None else list(argv)) or 0
    except KeyboardInterrupt as e:
        return report(e)
    except errors as e:
        return report(e)
