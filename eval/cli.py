"""What every ``python -m eval`` subcommand's parser shares: mistakes become one ``error:`` line.

``Parser`` raises ``UsageError`` instead of printing usage and exiting; each ``main`` catches it (and
the library's one-line ``ValueError``s), prints ``error: MESSAGE`` on stderr and returns 2.
"""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """A bad command line or input file: reported as one ``error:`` line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(message)
