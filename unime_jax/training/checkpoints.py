"""Resumable training checkpoints with orbax: train state, data iterator, resolved config, identity.

Items of each step directory:
    state   trainable params (LoRA only when training LoRA), optimizer state, step, RNG, counters
    data    the grain iterator state, one JSON per process (grain's own orbax handler)
    config  the resolved run config
    meta    what the state belongs to: model type and architecture, trainable parameter shapes

orbax writes each step to a temporary directory and renames it when complete, so a crash never
leaves a half-written "latest" checkpoint, and an existing step is never overwritten. A
checkpoint from a different model or config is refused with a message naming the difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint in the work directory was written for another model or run config."""


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
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
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
        target = {
            k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for k, x in _leaves(state).items()
        }
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        leaves = [restored["state"][k] for k in sorted(restored["state"])]
        return jax.tree.unflatten(jax.tree.structure(state), leaves)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
