"""Records → examples: every side of a record through the featurizer, keys prefixed by role.

Stage 1 (NLI): ``anchor_*``, ``positive_*``, ``negative_*`` token arrays and ``teacher_anchor``,
``teacher_positive``, ``teacher_negative`` (float32 (dim,)).
Stage 2 (MMEB): ``query_*``, ``target_*`` featurizer arrays and ``target_ids`` (int32 scalar); with
k attached negatives also ``negative_*`` with a leading (k,) axis, ``valid_negatives`` (k,) bool
(False: the data had no negative for the slot) and, for mined ones, ``mined_target_ids`` (k,) (both
named outside the ``negative_`` prefix, which the engine reads as model inputs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from unime_jax.data.errors import BadSample
from unime_jax.data.images import load_image
from unime_jax.data.nli import NLI_COLUMNS, NliRecord
from unime_jax.processing.text import TRUNCATED, Featurizer

if TYPE_CHECKING:  # stage-1 users need not have pyarrow, which the MMEB reader imports
    from PIL import Image

    from unime_jax.data.mmeb import MmebRecord, TextImage

__all__ = ["NLI_ROLES", "Example", "MmebExamples", "NliExamples", "mmeb_pair", "mmeb_side", "mmeb_where"]

NLI_ROLES = ("anchor", "positive", "negative")  # sent0, sent1, hard_neg


@dataclass(frozen=True)
class Example:
    arrays: dict[str, np.ndarray]  # fixed shapes: examples stack into a static batch
    truncated: int = 0  # texts the featurizer shortened to fit
    missing_negatives: int = 0  # negative slots without a negative (masked in valid_negatives)


def _nonempty(text: str, where: str) -> str:
    if not text.strip():
        raise BadSample("empty_text", where)
    return text


def _featurize(
    featurizer: Featurizer, text: str, image: Image.Image | None
) -> tuple[dict[str, np.ndarray], int]:
    features = dict(featurizer(text, image))
    return features, int(features.pop(TRUNCATED, False))


def _prefixed(role: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{role}_{key}": value for key, value in arrays.items()}


@dataclass(frozen=True)
class NliExamples:
    """Stage-1 example from an :class:`NliRecord` that carries teacher embeddings."""

    featurizer: Featurizer

    def __call__(self, record: NliRecord) -> Example:
        if record.teacher is None:
            raise ValueError("stage-1 examples need teacher embeddings: open the NliSource with teacher_dir")
        arrays: dict[str, np.ndarray] = {}
        truncated = 0
        for role, column, text in zip(NLI_ROLES, NLI_COLUMNS, record.texts, strict=True):
            where = f"{record.file} row {record.row} column {column}"
            features, cut = _featurize(self.featurizer, _nonempty(text, where), None)
            arrays |= _prefixed(role, features)
            truncated += cut
        teacher = record.teacher.astype(np.float32)
        arrays |= {f"teacher_{role}": teacher[i] for i, role in enumerate(NLI_ROLES)}
        return Example(arrays, truncated)


Side = tuple[str, "Image.Image | None"]  # one side of an MMEB pair as the model takes it


def mmeb_where(record: MmebRecord) -> str:
    """Names a record in skip logs and reports: file, row and subset."""
    return f"{record.file} row {record.row} ({record.subset})"


def mmeb_side(side: TextImage, image_root: Path, where: str, image_size: int | None = None) -> Side:
    """A side's text and decoded image (None without one), resized to image_size x image_size when
    given (``data.mmeb.image_size``); BadSample when either is unusable."""
    text = _nonempty(side.text, where)
    return text, load_image(image_root / side.image_path, where, image_size) if side.image_path else None


def mmeb_pair(record: MmebRecord, image_root: Path, image_size: int | None = None) -> tuple[Side, Side]:
    """(query, target) of a record as stage 2 embeds them; the miner embeds exactly these."""
    where = mmeb_where(record)
    query = mmeb_side(record.query, image_root, f"{where} qry", image_size)
    return query, mmeb_side(record.target, image_root, f"{where} pos", image_size)


@dataclass(frozen=True)
class MmebExamples:
    """Stage-2 example from an :class:`MmebRecord`; images are read from `image_root` and resized
    to image_size x image_size first when it is set."""

    featurizer: Featurizer
    image_root: Path
    image_size: int | None = None

    def __call__(self, record: MmebRecord) -> Example:
        (query, cut_query), (target, cut_target) = (
            _featurize(self.featurizer, *side) for side in mmeb_pair(record, self.image_root, self.image_size)
        )
        arrays = _prefixed("query", query) | _prefixed("target", target)
        arrays["target_ids"] = np.int32(record.target_id)
        truncated = cut_query + cut_target
        if not record.negatives:
            return Example(arrays, truncated)
        where = mmeb_where(record)
        # A slot without a negative (empty text: data negatives only) holds the target's arrays, so
        # that shapes stay fixed, and is masked out of the loss by valid_negatives.
        valid = [bool(neg.text.strip()) for neg in record.negatives]
        sides = [
            _featurize(
                self.featurizer, *mmeb_side(neg, self.image_root, f"{where} negative {j}", self.image_size)
            )
            if ok
            else (target, 0)
            for j, (neg, ok) in enumerate(zip(record.negatives, valid, strict=True))
        ]
        arrays |= _prefixed("negative", {key: np.stack([s[0][key] for s in sides]) for key in sides[0][0]})
        arrays["valid_negatives"] = np.asarray(valid)
        if record.negative_target_ids:
            arrays["mined_target_ids"] = np.asarray(record.negative_target_ids, np.int32)
        truncated += sum(s[1] for s in sides)
        return Example(arrays, truncated, missing_negatives=valid.count(False))
