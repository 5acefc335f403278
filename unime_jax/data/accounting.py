"""Counting skipped and truncated samples, in the training process, with exact resume.

Batches are featurized in grain workers (separate processes), so counts travel inside each batch
under :data:`STATS_KEY`. The last pipeline stage, :class:`DataIterator`, runs in the training
process: it removes that entry, adds it to per-epoch totals that are part of its checkpointed
state, and stops the run when too large a fraction of samples was bad.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grain

from unime_jax.data.errors import DataError

__all__ = ["STATS_KEY", "BatchReport", "DataCounts", "DataIterator", "SkipPolicy"]

STATS_KEY = "__data_stats__"  # batch entry carrying a BatchReport; removed before the engine sees the batch
_RECENT_SKIPS = 20  # skip locations kept for the error summary


@dataclass
class DataCounts:
    samples: int = 0  # batch slots filled (each slot's own sample was drawn once)
    skipped: dict[str, int] = field(default_factory=dict)  # slots whose own sample was bad, by reason
    bad_replacements: int = 0  # random replacement draws that were bad as well
    truncated: int = 0  # texts shortened to fit max_len
    missing_negatives: int = 0  # data-negative slots the data left empty (masked, not skipped)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add(self, other: DataCounts) -> None:
        self.samples += other.samples
        self.skipped = dict(Counter(self.skipped) + Counter(other.skipped))
        self.bad_replacements += other.bad_replacements
        self.truncated += other.truncated
        self.missing_negatives += other.missing_negatives

    def metrics(self, prefix: str = "data/") -> dict[str, int]:
        """Flat metric names → counts, e.g. ``data/skipped/missing_image``."""
        flat = {
            f"{prefix}samples": self.samples,
            f"{prefix}skipped": self.num_skipped,
            f"{prefix}bad_replacements": self.bad_replacements,
            f"{prefix}truncated": self.truncated,
            f"{prefix}missing_negatives": self.missing_negatives,
        }
        return flat | {f"{prefix}skipped/{reason}": n for reason, n in sorted(self.skipped.items())}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataCounts:
        return cls(**data)


@dataclass(frozen=True)
class BatchReport:
    counts: DataCounts
    skipped_where: tuple[str, ...]  # "reason: file row column" of each skipped sample


@dataclass(frozen=True)
class SkipPolicy:
    max_bad_fraction: float  # of samples, over the whole run
    min_samples: int  # judge only after this many samples


class DataIterator(grain.DatasetIterator):
    """Yields batches without their report; keeps per-epoch counts; stops on too many bad samples.

    Read by the engine: :attr:`epoch` (of the last batch returned), :meth:`epoch_counts`,
    :meth:`total_counts`. Checkpoint it as an orbax Composite item with
    ``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)``: the counts are part of its
    state, so after a resume they equal those of an uninterrupted run.
    """

    def __init__(self, parent: grain.DatasetIterator, batches_per_epoch: int, policy: SkipPolicy) -> None:
        super().__init__(parent)
        self._batches_per_epoch = batches_per_epoch
        self._policy = policy
        self._batches = 0
        self._epochs: dict[int, DataCounts] = {}
        self._recent: list[str] = []

    def __next__(self) -> dict[str, Any]:
        batch = dict(next(self._parent))
        report: BatchReport = batch.pop(STATS_KEY)
        self._epochs.setdefault(self._batches // self._batches_per_epoch, DataCounts()).add(report.counts)
        self._recent = [*self._recent, *report.skipped_where][-_RECENT_SKIPS:]
        self._batches += 1
        self._check()
        return batch

    @property
    def epoch(self) -> int:
        return max(self._batches - 1, 0) // self._batches_per_epoch

    def epoch_counts(self, epoch: int) -> DataCounts:
        return self._epochs.get(epoch, DataCounts())

    def total_counts(self) -> DataCounts:
        total = DataCounts()
        for counts in self._epochs.values():
            total.add(counts)
        return total

    def _check(self, final: bool = False) -> None:
        """DataError when too large a fraction of the samples was bad; judged once ``min_samples``
        were seen, or at the end (``final``) on however few."""
        total = self.total_counts()
        if not final and total.samples < self._policy.min_samples:
            return
        if total.num_skipped > self._policy.max_bad_fraction * total.samples:
            raise DataError(self._summary(total))

    def check_final(self) -> None:
        """At the end of a run: the limit judged on every sample seen, however few (a run shorter
        than ``min_samples`` would otherwise never be judged)."""
        self._check(final=True)

    def summary(self) -> str:
        """One line for the end of a run: samples seen, skipped by reason, truncated."""
        total = self.total_counts()
        reasons = "".join(f", {reason} {n}" for reason, n in sorted(total.skipped.items()))
        share = f" ({total.num_skipped / total.samples:.1%})" if total.samples else ""
        return (
            f"{total.samples} samples, {total.num_skipped} skipped as bad{share}{reasons}; "
            f"{total.bad_replacements} bad replacement draws, {total.truncated} texts truncated"
            + (f", {total.missing_negatives} negative slots empty" if total.missing_negatives else "")
        )

    def _summary(self, total: DataCounts) -> str:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(total.skipped.items()))
        recent = "\n".join(f"  {where}" for where in self._recent)
        return (
            f"{total.num_skipped} of {total.samples} samples ({total.num_skipped / total.samples:.1%}) were bad "
            f"and skipped, over data.loader.max_bad_fraction={self._policy.max_bad_fraction}: {reasons}; "
            f"{total.bad_replacements} replacement draws were bad too, {total.truncated} texts truncated.\n"
            f"Last skipped samples:\n{recent}\n"
            "Fix or remove these records (or the image files they name), or raise data.loader.max_bad_fraction."
        )

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "batches": self._batches,
            "epochs": {str(e): c.to_json() for e, c in self._epochs.items()},  # JSON keys are strings
            "recent_skips": list(self._recent),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._batches = state["batches"]
        self._epochs = {int(e): DataCounts.from_json(c) for e, c in state["epochs"].items()}
        self._recent = list(state["recent_skips"])
