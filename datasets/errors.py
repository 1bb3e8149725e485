"""Errors a user can act on, shared by every molscale command.

Library code raises these; only the entry points (``python -m datasets``, ``trainer/main.py``,
``evals/generate.py``) turn them into one line on stderr and an exit code:

    2  bad input: an argument, a config key, a missing or malformed file, dataset or checkpoint
    1  a failure while running: storage that keeps failing, too many corrupt shards, non-finite losses

Anything else escaping an entry point is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class MolscaleError(Exception):
    """Base class: the message is one sentence (or a few) that says what to do."""

    exit_code = EXIT_FAILED


class InputError(MolscaleError):
    """Bad input, arguments or configuration, found before (or instead of) doing the work."""

    exit_code = EXIT_BAD_INPUT


class RunError(MolscaleError):
    """The work started and could not finish."""

    exit_code = EXIT_FAILED


def report(err: MolscaleError, prefix: str = "error") -> int:
    """Print ``err`` as one line on stderr; its exit code."""
    print(f"{prefix}: {err}", file=sys.stderr)
    return err.exit_code
