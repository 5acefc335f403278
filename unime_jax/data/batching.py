"""Stacking slots into one static-shape batch, optionally cut to a length bucket."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from unime_jax.data.accounting import STATS_KEY, BatchReport, DataCounts
from unime_jax.data.packing import PackSpec, pack_batch
from unime_jax.data.skipping import Slot

__all__ = ["Collate", "cut_to_buckets", "stack_examples"]

_MASK = "attention_mask"
_SEQUENCE_KEYS = ("input_ids", _MASK)  # right-padded along the last axis, cut together per role


def stack_examples(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-key along a new batch axis; keys and shapes must agree (the Featurizer contract)."""
    first = examples[0]
    for i, example in enumerate(examples[1:], 1):
        if example.keys() != first.keys():
            raise ValueError(
                f"examples 0 and {i} of a batch have different keys ({sorted(first.keys() ^ example.keys())} "
                "in one only); a Featurizer must return the same keys for every input "
                "(give inputs without an image zero image arrays)"
            )
        for key, value in example.items():
            if np.shape(value) != np.shape(first[key]):
                raise ValueError(
                    f"'{key}' has shape {np.shape(first[key])} in example 0 and {np.shape(value)} in example "
                    f"{i} of a batch; a Featurizer must return fixed shapes (pad to a per-config maximum)"
                )
    return {key: np.stack([example[key] for example in examples]) for key in first}


def _bucket(length: int, buckets: Sequence[int], padded: int) -> int:
    fitting = [b for b in buckets if b >= length]
    return min(fitting[0], padded) if fitting else padded


def cut_to_buckets(batch: dict[str, np.ndarray], buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """Cut each role's right-padded sequences to the smallest bucket holding its longest row."""
    out = dict(batch)
    for key, mask in batch.items():
        if not key.endswith(_MASK):
            continue
        role = key[: -len(_MASK)]
        length = _bucket(int(mask.sum(axis=-1).max()), buckets, mask.shape[-1])
        for name in _SEQUENCE_KEYS:
            if role + name in out:
                out[role + name] = out[role + name][..., :length]
    return out


@dataclass(frozen=True)
class Collate:
    """grain ``batch_fn``: slots → flat dict of stacked arrays plus a :class:`BatchReport`."""

    bucket_lengths: tuple[int, ...] = ()
    pack: PackSpec | None = None  # regroup into the packed layout (then no bucket cut)

    def __call__(self, slots: Sequence[Slot]) -> dict[str, Any]:
        batch = stack_examples([slot.example.arrays for slot in slots])
        if self.pack is not None:
            batch = pack_batch(batch, self.pack)
        elif self.bucket_lengths:
            batch = cut_to_buckets(batch, self.bucket_lengths)
        skipped = [slot.skipped for slot in slots if slot.skipped is not None]
        counts = DataCounts(
            samples=len(slots),
            skipped=dict(Counter(bad.reason for bad in skipped)),
            bad_replacements=sum(slot.bad_replacements for slot in slots),
            truncated=sum(slot.example.truncated for slot in slots),
            missing_negatives=sum(slot.example.missing_negatives for slot in slots),
        )
        batch[STATS_KEY] = BatchReport(counts, tuple(f"{bad.reason}: {bad.where}" for bad in skipped))
        return batch
