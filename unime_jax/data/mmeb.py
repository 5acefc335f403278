"""Stage-2 source: MMEB-train (``TIGER-Lab/MMEB-train``) query/target pairs with image paths.

Directory layout, as the HF dataset repo downloads (``huggingface-cli download TIGER-Lab/MMEB-train
--repo-type dataset --local-dir ROOT``)::

    ROOT/<Subset>/<split>-00000-of-00001.parquet     split: original | diverse_instruction
    IMAGE_ROOT/images/<Subset>/...                   images.zip unzipped; paths in the parquet
                                                     files are relative to IMAGE_ROOT

Columns used: ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path`` (an empty path = no
image). The optional ``neg_text``/``neg_image_path`` of some subsets are not read here: UniME, like
VLM2Vec v1, takes its negatives from the batch, and ``data_negatives`` reads them for
``stage2.negatives.mode: data``. Texts keep the data's Phi-3 ``<|image_1|>``
placeholder; adapting it to a backbone is the featurizer's job.

As VLM2Vec, each subset contributes its first ``max_per_subset`` rows (VLM2Vec's recipe: 100k;
UniME's paper: ≤50k, 662k pairs in all).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unime_jax.data.errors import DataError

__all__ = ["MMEB_SPLITS", "MMEB_TRAIN_SUBSETS", "MmebRecord", "MmebSource", "TextImage", "subset_files"]

MMEB_SPLITS = ("original", "diverse_instruction")
# The 20 in-distribution training subsets (VLM2Vec v1 README's training command).
MMEB_TRAIN_SUBSETS = (
    "A-OKVQA", "ChartQA", "CIRR", "DocVQA", "HatefulMemes", "ImageNet_1K", "InfographicsVQA",
    "MSCOCO", "MSCOCO_i2t", "MSCOCO_t2i", "N24News", "NIGHTS", "OK-VQA", "SUN397", "VisDial",
    "Visual7W", "VisualNews_i2t", "VisualNews_t2i", "VOC2007", "WebQA",
)  # fmt: skip
COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")


@dataclass(frozen=True)
class TextImage:
    """One side of a pair: instruction text and an image path relative to the image root ("" = none)."""

    text: str
    image_path: str


@dataclass(frozen=True)
class MmebRecord:
    index: int  # position in this source (what a mined-negatives table refers to)
    subset: str
    row: int  # row in `file`
    file: str
    query: TextImage
    target: TextImage
    target_id: int  # equal ids ⇔ identical target (text and image path), across subsets
    negatives: tuple[TextImage, ...] = ()  # attached later by a transform (mined hard negatives)
    negative_target_ids: tuple[int, ...] = ()


def subset_files(root: Path, subset: str, split: str) -> list[Path]:
    return sorted((root / subset).glob(f"{split}-*.parquet"))


@dataclass(frozen=True)
class _Part:
    """Rows of one parquet file that the source uses."""

    subset: str
    file: Path
    table: pa.Table
    start: int  # source index of the first row


class MmebSource:
    """Random-access MMEB-train pairs over the chosen subsets, in subset order.

    Args:
      root: the dataset directory (layout in the module docstring).
      split: ``original`` or ``diverse_instruction``.
      subsets: subset names; empty = every subset directory that has the split.
      max_per_subset: keep each subset's first rows up to this many; None keeps all.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "original",
        subsets: tuple[str, ...] = (),
        max_per_subset: int | None = 100_000,
    ) -> None:
        if split not in MMEB_SPLITS:
            raise DataError(f"unknown MMEB split {split!r}; choose one of {', '.join(MMEB_SPLITS)}")
        self.root = Path(root)
        self.split = split
        self.subsets = tuple(subsets) or self._available()
        self.max_per_subset = max_per_subset
        self._parts: list[_Part] | None = self._load()
        self._starts = np.array([p.start for p in self._parts], np.int64)
        self._length = sum(p.table.num_rows for p in self._parts)
        self.subset_sizes = {
            s: sum(p.table.num_rows for p in self._parts if p.subset == s) for s in self.subsets
        }
        self.target_ids = _target_ids(self._parts)

    def _available(self) -> tuple[str, ...]:
        if not self.root.is_dir():
            raise DataError(f"MMEB root {self.root} is not a directory")
        found = tuple(
            sorted(d.name for d in self.root.iterdir() if subset_files(self.root, d.name, self.split))
        )
        if not found:
            raise DataError(f"no <Subset>/{self.split}-*.parquet files under {self.root}")
        return found

    def _load(self) -> list[_Part]:
        parts: list[_Part] = []
        start = 0
        for subset in self.subsets:
            files = subset_files(self.root, subset, self.split)
            if not files:
                raise DataError(
                    f"MMEB subset {subset!r} has no {self.split}-*.parquet in {self.root / subset}; "
                    f"subsets with that split: {', '.join(self._available())}"
                )
            left = self.max_per_subset
            for file in files:
                if left is not None and left <= 0:
                    break
                table = _read(file)
                if left is not None:
                    table = table.slice(0, left)
                    left -= table.num_rows
                parts.append(_Part(subset, file, table, start))
                start += table.num_rows
        return parts

    @functools.cached_property
    def sha256(self) -> str:
        """Checksum of the records this source serves: subset sizes and the four columns, in order.

        What a mined-negatives table is tied to; independent of how the rows are split into files.
        """
        parts = self._parts if self._parts is not None else self._load()
        digest = hashlib.sha256(json.dumps(self.subset_sizes).encode())
        for column in COLUMNS:
            values = [v for p in parts for v in pc.fill_null(p.table.column(column), "").to_pylist()]
            digest.update(json.dumps(values).encode())
        return digest.hexdigest()

    @functools.cached_property
    def has_images(self) -> bool:
        """Whether any record this source serves names an image (query or target)."""
        parts = self._parts if self._parts is not None else self._load()
        return any(
            bool(pc.any(pc.not_equal(pc.fill_null(p.table.column(column), ""), "")).as_py())
            for p in parts
            for column in ("qry_image_path", "pos_image_path")
        )

    def __getstate__(self) -> dict[str, Any]:
        # Workers reread the parquet files (fast, memory-mapped) rather than receive a pickled copy.
        return {**self.__dict__, "_parts": None}

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> MmebRecord:
        if self._parts is None:
            self._parts = self._load()
        if not 0 <= index < self._length:
            raise IndexError(f"MMEB source index {index} out of range [0, {self._length})")
        part = self._parts[int(np.searchsorted(self._starts, index, side="right")) - 1]
        row = index - part.start
        qry, qry_image, pos, pos_image = (_text(part.table, column, row) for column in COLUMNS)
        return MmebRecord(
            index=index,
            subset=part.subset,
            row=row,
            file=str(part.file),
            query=TextImage(qry, qry_image),
            target=TextImage(pos, pos_image),
            target_id=int(self.target_ids[index]),
        )


def _read(file: Path) -> pa.Table:
    try:
        schema = pq.read_schema(file)
        missing = [c for c in COLUMNS if c not in schema.names]
        if missing:
            raise DataError(f"{file} lacks column(s) {', '.join(missing)} (has {', '.join(schema.names)})")
        for column in COLUMNS:  # texts and image paths: a number or a list here is not a record
            kind = schema.field(column).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
                raise DataError(f"{file}: column {column!r} holds {kind}, not strings; MMEB-train's are strings")
        table = pq.read_table(file, columns=list(COLUMNS))
        # A column with no value at all is typed null; as strings it reads like the rest ("" = none).
        return table.cast(pa.schema([pa.field(c, pa.string()) for c in COLUMNS]))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read MMEB parquet file {file}: {e}") from e


def _text(table: pa.Table, column: str, row: int) -> str:
    value = table.column(column)[row].as_py()
    return "" if value is None else value


def _target_ids(parts: list[_Part]) -> np.ndarray:
    """Dense int32 ids, equal exactly when (pos_text, pos_image_path) are equal."""
    chunks = [
        chunk
        for p in parts
        for chunk in pc.binary_join_element_wise(
            pc.fill_null(p.table.column("pos_text"), ""),
            pc.fill_null(p.table.column("pos_image_path"), ""),
            "\0",
        )
        .cast(pa.large_string())
        .chunks
    ]
    keys = pa.chunked_array(chunks, type=pa.large_string()).combine_chunks()
    return pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False).astype(np.int32)
