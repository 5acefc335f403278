"""Attaching mined hard negatives to stage-2 records (a grain map before featurization).

A mining run (``python -m unime_jax.mine``, to come) stores, for every record of an
:class:`MmebSource`, the source indices of its K hardest candidate targets. This transform turns
the first k of them into ``record.negatives``; the example builder then featurizes them into
``negative_*`` arrays with a leading (k,) axis and ``mined_target_ids``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from unime_jax.data.errors import DataError

if TYPE_CHECKING:
    from unime_jax.data.mmeb import MmebRecord, MmebSource

__all__ = ["MinedNegatives"]


@dataclass(frozen=True)
class MinedNegatives:
    """Args: source: the records' source; table: (len(source), K) int source indices, hardest first; k ≤ K."""

    source: MmebSource
    table: np.ndarray
    k: int

    def __post_init__(self) -> None:
        rows, width = self.table.shape
        if rows != len(self.source) or not 0 < self.k <= width:
            raise DataError(
                f"mined-negative table is {rows}x{width}, need {len(self.source)} rows (one per record) and "
                f"at least k={self.k} columns; mine again for this source and subset selection"
            )

    def __call__(self, record: MmebRecord) -> MmebRecord:
        mined = [self.source[int(j)] for j in self.table[record.index, : self.k]]
        return dataclasses.replace(
            record,
            negatives=tuple(m.target for m in mined),
            negative_target_ids=tuple(m.target_id for m in mined),
        )
