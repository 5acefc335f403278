"""Multi-file artefacts (a model directory, an export) that appear whole or not at all.

:func:`atomic_directory` hands out a hidden sibling of the target to fill and renames it into
place once everything is written. A run killed half way leaves only that sibling, which the next
attempt removes before starting again; the target itself never exists half-written, so "the
directory exists" can serve as "the work is done". :func:`write_text` does the same for one file.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_directory",
    "partial_path",
    "process_partial_path",
    "require_new_directory",
    "sync_processes",
    "write_text",
]


def partial_path(out: Path) -> Path:
    """Where :func:`atomic_directory` builds ``out``: ``dir/.name.partial``."""
    return out.with_name(f".{out.name}.partial")


def require_new_directory(out: Path) -> None:
    """FileExistsError unless ``out`` is absent or an empty directory, as :func:`atomic_directory`
    requires; callers check it before slow work (loading a model) as well."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new directory or delete it")


def sync_processes(name: str) -> None:
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

    Raises FileExistsError for a non-empty ``out`` without ``replace``, before anything is written,
    and again, leaving ``out`` as it is, when ``out`` was filled by someone else meanwhile.
    On any failure (an exception, Ctrl-C) the temporary directory is removed and ``out`` is untouched.
    """
    out = Path(out)
    partial = partial_path(out)
    if not replace:
        require_new_directory(out)
    primary = not collective or _is_primary()
    sync = sync_processes if collective else lambda name: None
    if primary:
        shutil.rmtree(partial, ignore_errors=True)  # what a killed earlier attempt left
        partial.mkdir(parents=True)
    sync(f"atomic_directory:start:{out}")
    try:
        yield partial
        sync(f"atomic_directory:written:{out}")
        if primary:
            _rename_into_place(partial, out, replace)
        sync(f"atomic_directory:done:{out}")
    except BaseException:
        if primary:
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _rename_into_place(partial: Path, out: Path, replace: bool) -> None:
    if not replace:
        try:
            os.rename(partial, out)  # onto nothing or an empty directory; never over another's files
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FileExistsError(
                f"{out} was filled by another process while this one wrote it; its files are kept and "
                "this copy is discarded (choose a new directory, or delete it and rerun)"
            ) from e
        return
    # A directory cannot be renamed over a non-empty one: the old one steps aside under a name of
    # its own (another writer's leftovers cannot collide with it), then is removed.
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:12]}")
    moved = out.is_dir()
    if moved:
        os.replace(out, old)
    try:
        os.replace(partial, out)
    except OSError:
        if moved:
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def process_partial_path(path: Path) -> Path:
    """Where this process writes a file before renaming it to ``path``: a name of its own, as
    several hosts may write the same (identical) file into a shared directory."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.partial")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file whole or not at all: a hidden partial file renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = process_partial_path(path)
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
