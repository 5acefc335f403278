"""Stage-2 negatives from the data itself: MMEB-format ``neg_text``/``neg_image_path`` columns.

MMEB-train ships these columns in several subsets (one negative per row, strings), and
UniME-V2-style data carries explicit negatives (lists of strings per row). UniME and VLM2Vec v1
take theirs from the batch; ``stage2.negatives.mode: data`` (or ``in_batch_data``, with the batch's
top-k as well) uses the data's. :class:`DataNegatives` attaches each record's first k usable
negatives, read from the record's own parquet file and row. The example builder embeds them as it
embeds targets (the same image root, image size and prompts) into the ``negative_*`` arrays that
mined negatives use, and the loss takes them through the same β filter.

A negative with an empty text (``""``, null, a list shorter than k, or a subset without the
columns) is missing: its slot is filled with :data:`MISSING`, which the example builder masks
(``valid_negatives``) and counts (``data/missing_negatives``); the record itself is kept.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from unime_jax.data.errors import DataError
from unime_jax.data.mmeb import TextImage, subset_files

if TYPE_CHECKING:
    from unime_jax.data.mmeb import MmebRecord, MmebSource

__all__ = ["MISSING", "NEG_COLUMNS", "DataNegatives", "check_data_negatives", "record_negatives"]

NEG_COLUMNS = ("neg_text", "neg_image_path")
MISSING = TextImage("", "")  # a slot without a usable negative


def _holds_strings(kind: pa.DataType) -> bool:
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)


def _cannot_read(file: str | Path, error: Exception) -> DataError:
    return DataError(f"cannot read MMEB parquet file {file}: {error}")


def _negative_fields(file: str | Path) -> list[str]:
    """The negative columns ``file`` has; DataError naming the file when its schema does not read
    or a column holds something other than strings or lists of strings."""
    try:
        schema = pq.read_schema(file)
    except (OSError, pa.ArrowException) as e:
        raise _cannot_read(file, e) from e
    present = [column for column in NEG_COLUMNS if column in schema.names]
    for column in present:
        if not _holds_strings(schema.field(column).type):
            raise DataError(
                f"{file}: column {column!r} holds {schema.field(column).type}, not strings or lists of "
                "strings (MMEB's negatives)"
            )
    return present


# Unbounded, one entry per parquet file of the run: records come in shuffled order from some 20
# MMEB-train subsets, and a bounded cache would read a file's negative columns again for nearly
# every record. Each process (and loader worker) holds the negative columns once, text only.
@functools.cache
def _negative_columns(file: str) -> tuple[pa.ChunkedArray | None, pa.ChunkedArray | None]:
    """The file's neg_text and neg_image_path columns (None where a column is absent)."""
    present = _negative_fields(file)
    try:
        table = pq.read_table(file, columns=present)
    except (OSError, pa.ArrowException) as e:
        raise _cannot_read(file, e) from e
    return tuple(table.column(c) if c in present else None for c in NEG_COLUMNS)  # type: ignore[return-value]


def _values(column: pa.ChunkedArray | None, row: int) -> list[str]:
    """A cell as a list of strings: a string is one negative, a list several, null none."""
    value = None if column is None else column[row].as_py()
    if value is None:
        return []
    return [value] if isinstance(value, str) else [v or "" for v in value]


def record_negatives(record: MmebRecord, k: int) -> tuple[TextImage, ...]:
    """The record's first k negatives with a text, padded with :data:`MISSING` to k."""
    text_column, image_column = _negative_columns(record.file)
    texts, images = _values(text_column, record.row), _values(image_column, record.row)
    images += [""] * (len(texts) - len(images))
    usable = [TextImage(t, i) for t, i in zip(texts, images, strict=False) if t.strip()][:k]
    return (*usable, *[MISSING] * (k - len(usable)))


@dataclass(frozen=True)
class DataNegatives:
    """Record transform: ``record.negatives`` = its first k data negatives (:func:`record_negatives`)."""

    k: int

    def __call__(self, record: MmebRecord) -> MmebRecord:
        return dataclasses.replace(record, negatives=record_negatives(record, self.k))


def check_data_negatives(source: MmebSource, where: str = "stage2.negatives.mode") -> Sequence[str]:
    """The subsets whose files have a ``neg_text`` column; DataError when none has (the run would
    train with no negative at all), or when a file's negative columns are not strings (found here,
    before training, rather than in a loader worker mid-run)."""
    fields = {
        subset: [_negative_fields(f) for f in subset_files(source.root, subset, source.split)]
        for subset in source.subsets
    }
    with_negatives = [subset for subset, files in fields.items() if any("neg_text" in f for f in files)]
    if not with_negatives:
        raise DataError(
            f"{where} asks for the data's negatives, but no {source.split}-*.parquet file of the subsets "
            f"{', '.join(source.subsets)} under {source.root} has a neg_text column; use in_batch or mined "
            "negatives, or data with neg_text/neg_image_path columns"
        )
    return with_negatives
