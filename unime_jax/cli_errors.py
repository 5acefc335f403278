"""How the command lines fail: a one-line message and an exit status, never a raw traceback.

Every CLI (train, encode, eval, mine, teacher, convert) runs its body through :func:`run`:

- an error the project raises on purpose prints ``error: <message>``, whose text names the file,
  key or row and what to do. Such errors are the ones whose class has an ``exit_code`` (the
  project's own: ConfigError, DataError, CheckpointMismatchError, TrainingDivergedError...) and
  the CLI's ``expected`` types. A ValueError or OSError (bad values, missing files, a full or
  read-only disk) prints its message too, but may come from a library as well as from the
  project, so outside ``--debug`` it adds how to see the traceback;
- the exit status is the error's ``exit_code`` when it has one, else 1: 2 is a usage or config
  error (:class:`UsageError`, ``ConfigError``, or anything raised inside :func:`usage_errors`,
  i.e. found before the work started), 1 a failure while running;
- Ctrl-C exits 130, saying how to resume where the CLI can;
- any other exception is a bug: one line naming its type, with how to see the traceback.

``--debug`` (:func:`add_debug_flag`) or the environment variable ``UNIME_JAX_DEBUG=1`` also
prints the traceback. No jax here: ``--help`` and argument errors stay instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = [
    "DEBUG_ENV",
    "FAILURE",
    "INTERRUPTED",
    "USAGE",
    "UsageError",
    "add_debug_flag",
    "exit_code",
    "run",
    "usage_errors",
]

FAILURE, USAGE, INTERRUPTED = 1, 2, 130
DEBUG_ENV = "UNIME_JAX_DEBUG"


class UsageError(Exception):
    """The command cannot start as given: an argument, a config value or an input is wrong."""

    exit_code = USAGE


def exit_code(error: BaseException) -> int:
    return int(getattr(error, "exit_code", FAILURE))


@contextmanager
def usage_errors(*types: type[BaseException]) -> Iterator[None]:
    """Errors of ``types`` raised inside are usage errors (exit 2): checks made before any work."""
    try:
        yield
    except types as e:
        if exit_code(e) == USAGE:
            raise
        raise UsageError(str(e)) from e


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"on an error, also print its traceback (or set the environment variable {DEBUG_ENV}=1)",
    )


def _debugging(flag: bool) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run(
    body: Callable[[], int],
    *,
    expected: tuple[type[BaseException], ...] = (),
    debug: bool = False,
    on_interrupt: str | None = None,
) -> int:
    """``body()``'s exit status, or the status of the error it raised after printing one line.

    Args:
      expected: more error types the command raises on purpose; their message is the whole story.
      debug: print tracebacks too (also with ``UNIME_JAX_DEBUG=1``).
      on_interrupt: what to print on Ctrl-C (default: "interrupted").
    """
    show_traceback = _debugging(debug)
    try:
        return body()
    except KeyboardInterrupt:
        print(on_interrupt or "interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        if show_traceback:
            traceback.print_exc()
        hint = "" if show_traceback else f" (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
        if hasattr(e, "exit_code") or isinstance(e, expected):
            print(f"error: {_text(e)}", file=sys.stderr)
            return exit_code(e)
        if isinstance(e, (ValueError, OSError)):
            print(f"error: {_text(e)}{hint}", file=sys.stderr)
            return FAILURE
        # A bug: still one line, and the way to the traceback.
        print(f"error: unexpected {type(e).__name__}: {_text(e)}{hint}", file=sys.stderr)
        return FAILURE


def _text(error: BaseException) -> str:
    return str(error) or type(error).__name__
