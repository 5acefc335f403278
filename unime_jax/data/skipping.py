"""Skipping bad samples without changing batch sizes or determinism.

A bad sample (:class:`BadSample` from the source or the featurizer) is replaced by a sample drawn
at random from the same epoch of the same process shard, with an RNG seeded by (seed, index,
draw). The replacement is therefore a pure function of the position, so batch k stays a pure
function of (seed, k): with any number of workers, and after a resume.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from unime_jax.data.errors import BadSample, DataError
from unime_jax.data.examples import Example

__all__ = ["SkipBadSamples", "Slot"]

_log = logging.getLogger("unime_jax.data")


@dataclass(frozen=True)
class Slot:
    """One batch position: its example, and what had to be skipped to fill it."""

    example: Example
    skipped: BadSample | None = None  # the position's own sample, when it was bad
    bad_replacements: int = 0  # replacement draws that were bad as well


class SkipBadSamples(grain.MapDataset):
    """Maps records to :class:`Slot` s with `make_example`, replacing bad samples.

    Args:
      parent: one process's records; index ``e * len(parent) + i`` is record i of epoch e.
      make_example: record → Example; raises BadSample for a sample to skip.
      seed: seeds the replacement draws.
      max_draws: replacements tried before the run stops (the data is then mostly bad).
    """

    def __init__(
        self, parent: grain.MapDataset, make_example: Callable[[Any], Example], seed: int, max_draws: int
    ) -> None:
        super().__init__(parent)
        self._make_example = make_example
        self._seed = seed
        self._max_draws = max_draws

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"SkipBadSamples(max_draws={self._max_draws})"

    def _example(self, index: int) -> Example:
        return self._make_example(self._parent[index])

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        try:
            return Slot(self._example(index))
        except BadSample as bad:
            _log.warning("skipping bad sample (%s): %s", bad.reason, bad.where)
            return self._replacement(index, bad)

    def _replacement(self, index: int, skipped: BadSample) -> Slot:
        length = len(self._parent)
        epoch_start = index - index % length  # stay in the epoch: a later epoch is reshuffled differently
        for draw in range(self._max_draws):
            candidate = epoch_start + int(np.random.default_rng((self._seed, index, draw)).integers(length))
            try:
                return Slot(self._example(candidate), skipped, draw)
            except BadSample as bad:
                _log.warning("bad replacement sample (%s): %s", bad.reason, bad.where)
        raise DataError(
            f"{skipped.where} was bad ({skipped.reason}) and so were {self._max_draws} random replacements: "
            "most of the data is unusable; check the data paths (image root, files) before anything else"
        )
