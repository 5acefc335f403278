"""Progress bars: a live bar on a terminal, whole lines now and then in a log."""

from __future__ import annotations

import io
import os

import pytest

from unime_jax.progress import progress_bar


def test_a_log_gets_whole_lines_and_no_carriage_returns():
    log = io.StringIO()
    with progress_bar(total=10_000, desc="embed", unit="row", file=log) as bar:
        for _ in range(10_000):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 2  # the start and the end: no refresh within LOG_INTERVAL_S
    assert lines[0].startswith("embed:   0%") and lines[1].startswith("embed: 100%")
    assert log.getvalue().endswith("\n")


def test_each_refresh_in_a_log_is_a_line():
    log = io.StringIO()
    for _ in progress_bar(range(3), desc="steps", file=log, mininterval=0, maxinterval=0):
        pass
    shown = [line.split("|")[0].strip() for line in log.getvalue().splitlines()]
    assert shown[:4] == ["steps:   0%", "steps:  33%", "steps:  67%", "steps: 100%"]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_terminal_keeps_the_live_bar():
    parent, child = os.openpty()
    with os.fdopen(child, "w") as terminal:
        bar = progress_bar(total=2, file=terminal)
        bar.update(2)
        bar.close()
    output = os.read(parent, 4096).decode()
    os.close(parent)
    assert "\r" in output  # tqdm redraws in place
