"""Progress bars that suit where they print: live on a terminal, a line now and then in a log.

tqdm redraws its bar with carriage returns up to ten times a second. On a terminal that is one
live line; in a log file (a job's stderr, CI, ``2> run.log``) it is megabytes of redraws. Where
the stream is not a terminal, :func:`progress_bar` prints a whole line at most every
:data:`LOG_INTERVAL_S` seconds (and at the start and the end) instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm as auto_tqdm

__all__ = ["LOG_INTERVAL_S", "progress_bar"]

LOG_INTERVAL_S = 30.0


class _LogLines(plain_tqdm):
    """tqdm writing each refresh as a line of its own, without carriage returns."""

    @staticmethod
    def status_printer(file: Any) -> Callable[[str], None]:
        started = False

        def print_line(line: str) -> None:
            # Each refresh starts a new line; tqdm's close ends the last one with its newline.
            nonlocal started
            if line:
                file.write(("\n" if started else "") + line)
                file.flush()
                started = True

        return print_line


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> plain_tqdm:
    """A tqdm bar (same arguments) that prints whole lines every 30 s where ``file`` (default
    stderr) is not a terminal, and a live bar (or a notebook widget) where it is."""
    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    in_notebook = stream is sys.stderr and "ipykernel" in sys.modules  # tqdm.auto draws a widget there
    if in_notebook or (isatty is not None and isatty()):
        return auto_tqdm(iterable, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    kwargs.setdefault("maxinterval", LOG_INTERVAL_S)
    return _LogLines(iterable, **kwargs)
