"""Multi-file artefacts (a model directory, an export) that appear whole or not at all.

:func:`atomic_directory` hands out a hidden sibling of the target to fill and renames it into
place once everything is written. A run killed half way leaves only that sibling, which the next
attempt removes before starting again; the target itself never exists half-written, so "the
directory exists" can serve as "the work is done".
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "partial_path"]


def partial_path(out: Path) -> Path:
    """Where :func:`atomic_directory` builds ``out``: ``dir/.name.partial``."""
    return out.with_name(f".{out.name}.partial")


def _sync(name: str) -> None:
    """All processes reach this point before any goes on (a no-op for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _is_primary() -> bool:
    import jax

    return jax.process_index() == 0


@contextmanager
def atomic_directory(
    out: str | os.PathLike[str], *, replace: bool = False, collective: bool = False
) -> Iterator[Path]:
    """Yield a fresh temporary directory; when the block succeeds it becomes ``out``.

    Args:
      out: the directory to create. It must not exist, or be empty, unless ``replace``.
      replace: replace an existing ``out`` (the old one is removed only after the new one is in place).
      collective: every process of a multi-host run enters the block and writes into it together
        (an orbax save); process 0 makes, renames and removes the directories. Without it, the
        calling process alone does everything.

    Raises FileExistsError for a non-empty ``out`` without ``replace``, before anything is written.
    On any failure (an exception, Ctrl-C) the temporary directory is removed and ``out`` is untouched.
    """
    out = Path(out)
    partial = partial_path(out)
    if not replace and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new directory or delete it")
    primary = not collective or _is_primary()
    sync = _sync if collective else lambda name: None
    if primary:
        shutil.rmtree(partial, ignore_errors=True)  # what a killed earlier attempt left
        partial.mkdir(parents=True)
    sync(f"atomic_directory:start:{out}")
    try:
        yield partial
        sync(f"atomic_directory:written:{out}")
        if primary:
            _rename_into_place(partial, out)
        sync(f"atomic_directory:done:{out}")
    except BaseException:
        if primary:
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _rename_into_place(partial: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old")
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)  # a directory cannot be renamed over a non-empty one
    elif out.is_dir():
        out.rmdir()
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)
