"""Mined hard negatives for stage 2: the table ``python -m unime_jax.mine`` writes, and the grain map
that attaches them to records.

A mined directory::

    negatives.npy    int32 (records, K): for every record of an :class:`MmebSource`, the source indices
                     of its K hardest candidate targets, hardest first; a row of -1 = not mined
    scores.npy       float16 (records, K): their cosine similarity to the record's query (NaN for -1)
    manifest.json    the source it belongs to (split, subsets, record count, checksum, image
                     resize), the model, K, β, counts of padded, fallback and unmined rows, and the bad records

The miner writes the directory under a temporary name and renames it once complete. Training
(``stage2.negatives``) opens it with :func:`open_mined`, which refuses a table mined for other data.
:class:`MinedNegatives` turns the first k entries of a record's row into ``record.negatives``; the
example builder featurizes them into ``negative_*`` arrays with a leading (k,) axis and
``mined_target_ids``. A record whose row is -1 (its query or target could not be embedded, or no
other target was a candidate) is a bad sample: the pipeline skips and counts it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from unime_jax.data.errors import BadSample, DataError, read_json_object
from unime_jax.data.examples import mmeb_where

if TYPE_CHECKING:
    from unime_jax.data.mmeb import MmebRecord, MmebSource

__all__ = [
    "MANIFEST_FILE",
    "NEGATIVES_FILE",
    "SCORES_FILE",
    "MinedManifest",
    "MinedNegatives",
    "open_mined",
    "read_mined_manifest",
    "table_sha256",
    "write_mined",
]

MANIFEST_FILE = "manifest.json"
NEGATIVES_FILE = "negatives.npy"
SCORES_FILE = "scores.npy"
FORMAT = "unime-mined-negatives/1"
UNMINED = -1  # every entry of a record's row when the record has no mined negatives


@dataclass(frozen=True)
class MinedManifest:
    model: str  # the model directory whose embeddings ranked the candidates
    root: str  # the MMEB root (for messages: source_sha256 identifies the data)
    image_root: str  # directory the image paths are relative to
    split: str  # MMEB split
    subsets: tuple[str, ...]  # the source's subsets, in source order
    max_per_subset: int | None  # the source's per-subset cap
    records: int  # rows of the table: one per source record
    source_sha256: str  # MmebSource.sha256 of the source
    table_sha256: str  # table_sha256(negatives): what a resumed training run is tied to
    k: int  # columns of the table
    beta: float  # false-negative margin: candidates with S_ij > S_ii + beta were dropped
    across_subsets: bool  # candidates came from every subset (false: the record's own subset)
    counts: dict[str, int]  # rows padded, rows without a valid candidate, unmined rows, ...
    bad_records: tuple[dict[str, Any], ...]  # {index, reason, where} of records not embedded
    created: str  # UTC time the table was written, ISO 8601
    # data.mmeb.image_size the records' images were resized to; None = native size (also what
    # tables written before this field existed were mined at)
    image_size: int | None = None
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: Path) -> MinedManifest:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - data.keys() - {"format", "image_size"})
        if missing:
            raise DataError(
                f"mined-negatives manifest {path} lacks field(s) {', '.join(missing)}; mine again"
            )
        if data.get("format", FORMAT) != FORMAT:
            raise DataError(f"{path} has format {data['format']!r}, this code reads {FORMAT!r}; mine again")
        fields = {k: v for k, v in data.items() if k in names}
        return cls(**fields | {"subsets": tuple(data["subsets"]), "bad_records": tuple(data["bad_records"])})


def table_sha256(negatives: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(negatives, np.int32).tobytes()).hexdigest()


def _write_synced(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file and flush it to disk before the directory holding it is renamed into place."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_mined(out: Path, negatives: np.ndarray, scores: np.ndarray, manifest: MinedManifest) -> None:
    """Write a mined directory atomically: a crash leaves no directory that looks complete.

    An existing `out` is replaced (the caller decides whether that is allowed).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        _write_synced(partial / NEGATIVES_FILE, lambda f: np.save(f, negatives.astype(np.int32)))
        _write_synced(partial / SCORES_FILE, lambda f: np.save(f, scores.astype(np.float16)))
        _write_synced(
            partial / MANIFEST_FILE, lambda f: f.write(json.dumps(manifest.to_json(), indent=1).encode())
        )
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)  # a directory cannot be renamed over a non-empty one
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remine_hint(directory: Path) -> str:
    return f"mine again for this data: python -m unime_jax.mine --model MODEL --data CONFIG --out {directory}"


def read_mined_manifest(directory: str | os.PathLike[str]) -> MinedManifest:
    path = Path(directory) / MANIFEST_FILE
    data = read_json_object(path, "mined negatives", _remine_hint(Path(directory)))
    return MinedManifest.from_json(data, path)


def _source_mismatches(manifest: MinedManifest, source: MmebSource, image_size: int | None) -> list[str]:
    expected = {
        "records": len(source),
        "split": source.split,
        "subsets": tuple(source.subsets),
        "source_sha256": source.sha256,
        "image_size": image_size,
    }
    return [
        f"  {name}: table {getattr(manifest, name)!r}, configured source {want!r}"
        for name, want in expected.items()
        if getattr(manifest, name) != want
    ]


def open_mined(
    directory: str | os.PathLike[str], source: MmebSource, k: int, image_size: int | None
) -> np.ndarray:
    """The (records, K) table of `directory`, checked against `source`, the images' resize
    (``data.mmeb.image_size``) and its manifest; needs K ≥ k."""
    directory = Path(directory)
    manifest = read_mined_manifest(directory)
    wrong = _source_mismatches(manifest, source, image_size)
    if wrong:
        raise DataError(
            f"mined negatives {directory / MANIFEST_FILE} were mined for other data than data.mmeb "
            f"({source.root}):\n" + "\n".join(wrong) + f"\n{_remine_hint(directory)}"
        )
    path = directory / NEGATIVES_FILE
    try:
        table = np.load(path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read mined negatives {path}: {e}; {_remine_hint(directory)}") from e
    if (
        table.shape != (manifest.records, manifest.k)
        or table.dtype != np.int32
        or table_sha256(table) != manifest.table_sha256
    ):
        raise DataError(
            f"{path} ({table.dtype}{table.shape}) is not the table its manifest describes "
            f"(int32 ({manifest.records}, {manifest.k}), table_sha256); {_remine_hint(directory)}"
        )
    if k > manifest.k:
        raise DataError(
            f"stage2.negatives.k={k} but {path} holds {manifest.k} negatives per record; lower k or mine "
            f"again with --top-k {k}"
        )
    return table


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
        used = self.table[:, : self.k]
        if used.min() < UNMINED or used.max() >= rows:
            raise DataError(f"mined-negative table holds indices outside [{UNMINED}, {rows}); mine again")

    def __call__(self, record: MmebRecord) -> MmebRecord:
        row = self.table[record.index, : self.k]
        if row[0] == UNMINED:
            raise BadSample(
                "unmined_record", f"{mmeb_where(record)}: no mined negatives (see the table's manifest)"
            )
        mined = [self.source[int(j)] for j in row]
        return dataclasses.replace(
            record,
            negatives=tuple(m.target for m in mined),
            negative_target_ids=tuple(m.target_id for m in mined),
        )
