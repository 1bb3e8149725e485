"""Errors a user can act on, shared by every molscale command.

Library code raises these; only the entry points (``python -m datasets``, ``trainer/main.py``,
``evals/generate.py``) turn them into one line on stderr and an exit code:

    2  bad input: an argument, a config key, a missing or malformed file, dataset or checkpoint
    1  a failure while running: storage that keeps failing, too many corrupt shards, non-finite losses

Anything else escaping an entry point is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from molscale.datasets.redaction import redact_text

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


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line.

    An error raised in a worker process and raised again in the parent (a torch DataLoader worker, a Ray
    task) carries the worker's traceback as its message; its last line is the original ``module.Type: message``,
    and that message is what the user needs (Ray also keeps the original error as ``cause``). Any other message
    of several lines is joined.
    """
    cause = getattr(err, "cause", None)
    if isinstance(cause, MolscaleError) and cause is not err:
        return one_line(cause)
    text = str(err).strip()
    if "\n" not in text:
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:
        head, sep, message = lines[-1].partition(": ")
        return message if sep and " " not in head else lines[-1]
    return " ".join(lines)


def report(err: MolscaleError, prefix: str = "error") -> int:
    """Print ``err`` as one line on stderr; its exit code."""
    # messages name files and URLs; a URL's credentials never reach the terminal or a job's log
    print(f"{prefix}: {redact_text(one_line(err))}", file=sys.stderr)
    return err.exit_code
