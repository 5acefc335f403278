"""Resumable training checkpoints with orbax: train state, data iterator, resolved config, identity.

Items of each step directory:
    state   trainable params (LoRA only when training LoRA), optimizer state, step, RNG, counters
    data    the grain iterator state, one JSON per process (grain's own orbax handler)
    config  the resolved run config
    meta    what the state belongs to: model type and architecture, trainable parameter shapes

orbax writes each step to a temporary directory and renames it when complete, so a crash never
leaves a half-written "latest" checkpoint, and an existing step is never overwritten. A
checkpoint from a different model or config is refused with a message naming the difference.

A checkpoint that exists but does not restore (a truncated file, a damaged disk) is skipped by
:meth:`Checkpoints.restore_latest`: the newest one that restores is used, and each skipped one
is named with the reason and moved aside to ``<directory>.skipped/<step>``, never deleted. Only
read and decode errors mark a checkpoint unreadable; anything else (a device out of memory, a
state that does not fit the data pipeline, an interrupted or timed-out file system call) stops
the run and leaves the checkpoints as they are. In a multi-process run the processes agree on
each step (one that fails anywhere is skipped everywhere), and process 0 alone moves files.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from unime_jax.atomic import sync_processes
from unime_jax.model_io import first_line
from unime_jax.training.distributed import failing_processes


class CheckpointMismatchError(ValueError):
    """The checkpoint in the work directory was written for another model or run config."""

    exit_code = 2  # a config error for the command lines (unime_jax.cli_errors)


class UnreadableCheckpointError(RuntimeError):
    """An item of a checkpoint cannot be read back (truncated file, damaged disk); names the item."""


class NoUsableCheckpointError(RuntimeError):
    """Checkpoints exist, but none of them restores."""

    exit_code = 1  # a failure while running, for the command lines (unime_jax.cli_errors)


# Read and decode errors, by item: tensorstore reports damaged tensors as ValueError (orbax wraps
# it in a bare Exception), orbax's JSON items raise JSONDecodeError, and a missing file OSError.
# The data item's other ValueErrors are grain refusing a state: not a damaged file.
_READ_ERRORS = {"data": (OSError, json.JSONDecodeError)}
_DEFAULT_READ_ERRORS = (OSError, ValueError)
# Failures that say nothing about the files: a retry may well succeed.
_TRANSIENT_ERRNOS = {errno.EINTR, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.ENOMEM}
_TRANSIENT_STATUS = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "ABORTED")


def _read_error(error: BaseException, item: str) -> BaseException | None:
    """The read or decode error in ``error``'s chain of causes (None when there is none, or when
    it is a transient failure rather than a damaged file)."""
    kinds = _READ_ERRORS.get(item, _DEFAULT_READ_ERRORS)
    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, kinds):
        seen = seen.__cause__  # orbax raises a bare Exception from tensorstore's error
    if seen is None:
        return None
    if isinstance(seen, OSError) and seen.errno in _TRANSIENT_ERRNOS:
        return None
    return None if str(seen).startswith(_TRANSIENT_STATUS) else seen


def _reason(error: BaseException) -> str:
    """The first line of a restore error (tensorstore's run to pages), which names the file."""
    return f"{type(error).__name__}: {first_line(error, 300)}"


def describe_state(state: Any) -> dict[str, list[int]]:
    """Path -> shape of every leaf: the fingerprint a restored state must match."""
    return {jax.tree_util.keystr(p): list(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def _leaves(state: Any) -> dict[str, Any]:
    # Orbax stores a flat dict; the tree structure comes from the live state on restore.
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}


def _differences(saved: dict, current: dict, limit: int = 8) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            out.append(
                f"{key}: checkpoint {json.dumps(saved.get(key))[:200]} vs now {json.dumps(current.get(key))[:200]}"
            )
    return out[:limit]


def saved_config(directory: Path) -> tuple[int, dict] | None:
    """(step, run config) of the newest checkpoint under ``directory`` whose config reads; None if none.

    Read from orbax's JSON file directly: a cheap look before anything is loaded (the run's
    config-change check), with no orbax manager to start.
    """
    steps = sorted((int(p.name) for p in Path(directory).glob("*") if p.name.isdigit()), reverse=True)
    for step in steps:
        try:
            config = json.loads((Path(directory) / str(step) / "config" / "metadata").read_text())
        except (OSError, ValueError):
            continue  # unreadable: restore_latest will skip it and say why
        if isinstance(config, dict):
            return step, config
    return None


def _agreed(read: Callable[[], Any]) -> tuple[Any, str | None]:
    """(``read()``, None) when it succeeded on every process, else (None, why it failed): a
    collective, so that all processes go on to the same checkpoint."""
    try:
        value, why = read(), None
    except UnreadableCheckpointError as e:
        value, why = None, str(e)
    failed = failing_processes(why is not None)
    if failed and why is None:
        why = f"process(es) {', '.join(map(str, failed))} cannot read it (their output says why)"
    return value, why


class Checkpoints:
    """A work directory's checkpoints: save every N steps, keep the last K, resume the latest.

    Args:
      identity: what a checkpoint must match to be restored (model, stage, adapters, batch...).
      config: the resolved run config, saved with every checkpoint for the record.
    """

    def __init__(
        self, directory: Path, identity: dict, config: dict, *, keep: int = 3, async_save: bool = True
    ):
        self.directory = Path(directory).absolute()
        self.identity, self.config = identity, config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        # Restores go through the handler, not the manager: the manager ends each restore with a
        # barrier across processes, which a process whose read failed never reaches, so the others
        # would wait there forever. restore_latest agrees on each read itself instead.
        self._reader = ocp.CompositeCheckpointHandler()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
        items = {
            "state": ocp.args.StandardSave(_leaves(state)),
            "meta": ocp.args.JsonSave({**self.identity, "state": describe_state(state)}),
            "config": ocp.args.JsonSave(self.config),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def check_identity(self, step: int, state: Any) -> None:
        """CheckpointMismatchError when step ``step`` was written for another model or config."""
        self._check(step, self._meta(step), state)

    def _meta(self, step: int) -> dict:
        return self._item(step, "meta", ocp.args.JsonRestore())

    def _item(self, step: int, name: str, args: Any) -> Any:
        """One item of a checkpoint; UnreadableCheckpointError naming its directory when a file of
        it cannot be read or decoded (other errors propagate as they are)."""
        try:
            return self._reader.restore(self.directory / str(step), args=ocp.args.Composite(**{name: args}))[name]
        except Exception as e:
            cause = _read_error(e, name)
            if cause is None:
                raise
            raise UnreadableCheckpointError(f"{self.directory / str(step) / name}: {_reason(cause)}") from e

    def _check(self, step: int, saved: dict, state: Any) -> None:
        current = {**self.identity, "state": describe_state(state)}
        diffs = _differences(saved, current)
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} belongs to a different model or config:\n  "
                + "\n  ".join(diffs)
                + "\nUse a new workdir, or restore the settings the checkpoint was written with."
            )

    def restore(self, step: int, state: Any, data_iterator: Any | None = None) -> Any:
        """Load step `step` into the structure and shardings of `state` (and the iterator, in place)."""
        self.check_identity(step, state)
        return self._restore(step, state, data_iterator)

    def _restore(self, step: int, state: Any, data_iterator: Any | None) -> Any:
        target = {
            k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for k, x in _leaves(state).items()
        }
        restored = self._item(step, "state", ocp.args.StandardRestore(target))
        if data_iterator is not None:  # sets the iterator's position in place
            self._item(step, "data", grain.checkpoint.CheckpointRestore(data_iterator))
        leaves = [restored[k] for k in sorted(restored)]
        return jax.tree.unflatten(jax.tree.structure(state), leaves)

    def restore_latest(
        self, state: Any, data_iterator: Any | None = None, report: Callable[[str], None] = print
    ) -> tuple[Any, int | None]:
        """The newest checkpoint that restores, as (state, step); (state, None) when there is none.

        A checkpoint that fails to restore is skipped, and ``report`` names it and the reason; once
        an older one restores, the skipped ones are moved to ``<directory>.skipped/`` (kept, so a
        run that saves the same step again does not collide with them). A checkpoint of another
        model or config is not skipped: CheckpointMismatchError. NoUsableCheckpointError when
        none restores (nothing is moved then). Every process of a run calls it and all restore the
        same step: one that any process cannot read is skipped by all.
        """
        failures: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            saved, why = _agreed(lambda step=step: self._meta(step))
            if why is None:
                self._check(step, saved, state)  # another model or config is refused, not skipped
                restored, why = _agreed(lambda step=step: self._restore(step, state, data_iterator))
            if why is not None:
                failures.append((step, why))
                report(f"skipping checkpoint {self.directory / str(step)}: {why}")
                continue
            if failures:
                self._set_all_aside([bad for bad, _ in failures], report)
            return restored, step
        if failures:
            listing = "; ".join(f"step {step}: {why}" for step, why in failures)
            raise NoUsableCheckpointError(
                f"no checkpoint in {self.directory} restores ({listing}); move them away to start the "
                "stage over, or restore the files"
            )
        return state, None

    def _set_all_aside(self, steps: list[int], report: Callable[[str], None]) -> None:
        """Process 0 moves the skipped steps aside; every process then sees the directory without them."""
        if jax.process_index() == 0:
            for step in steps:
                report(f"moved the unusable checkpoint {self.directory / str(step)} to {self._set_aside(step)}")
        sync_processes(f"checkpoints:set_aside:{self.directory}")
        self.manager.reload()

    def _set_aside(self, step: int) -> Path:
        aside = self.directory.with_name(f"{self.directory.name}.skipped") / str(step)
        n = 1
        while aside.exists():
            aside, n = aside.with_name(f"{step}.{n}"), n + 1
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.directory / str(step), aside)
        return aside

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        self._reader.close()
