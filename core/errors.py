"""The errors a user can cause or meet, and their one-line form: every command prints
``error: MESSAGE`` on stderr, with no traceback, and exits with ``exit_code(error)``.

- ``UsageError``: a bad command line, prompt or input file (exit 2).
- ``ConfigError``: a bad configuration value or combination; the message starts with the key (exit 2).
- any other ``ValueError`` raised by meshlm's own code: a bad file, checkpoint or argument (exit 2).
- ``RunError``: a run that cannot go on (a full disk, a non-finite divergence, a lost peer; exit 1).
"""

from __future__ import annotations

import sys

USAGE_EXIT = 2
RUN_EXIT = 1
INTERRUPTED_EXIT = 130


class UsageError(ValueError):
    """A bad command line or input file: one ``error:`` line, exit code 2."""


class ConfigError(ValueError):
    """A user mistake in configuration; ``str()`` starts with the offending key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class RunError(RuntimeError):
    """A failure that ends a run (not a configuration mistake): a full disk, a non-finite
    divergence, a lost peer process. One ``error:`` line, exit code 1."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when it has none (for
    the multi-line messages of libraries such as orbax and XLA)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped, for an ``error:`` line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text).strip())


def exit_code(error: BaseException) -> int | None:
    """The exit code a command ends with for ``error``, or None for one that is not a user's
    mistake by its type (commands let those show their traceback, unless they catch the type, such
    as OSError for a file, themselves)."""
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED_EXIT
    if isinstance(error, RunError):
        return RUN_EXIT
    if isinstance(error, ValueError):
        return USAGE_EXIT
    return None


def report(error: BaseException) -> int:
    """Prints ``error``'s one line on stderr and returns its exit code (see ``exit_code``; 2 for a
    type a command chose to catch)."""
    message = "interrupted" if isinstance(error, KeyboardInterrupt) else one_line(str(error))
    print(f"error: {message or type(error).__name__}", file=sys.stderr, flush=True)
    code = exit_code(error)
    return USAGE_EXIT if code is None else code
