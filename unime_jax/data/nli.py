"""Stage-1 source: SimCSE's NLI triplets (``sent0,sent1,hard_neg``) with their teacher embeddings.

The CSV is SimCSE's ``nli_for_simcse.csv`` (~275k rows, a header row, three text columns). It is
checked in full when opened: a missing column or a row with the wrong number of fields is an error
naming the file, line, row and column; blank lines are skipped. Empty texts are not an error here: they are bad samples,
skipped and counted by the pipeline.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unime_jax.data import teacher_store
from unime_jax.data.errors import DataError

__all__ = ["NLI_COLUMNS", "NliRecord", "NliSource", "NliTable", "read_nli_csv"]

NLI_COLUMNS = ("sent0", "sent1", "hard_neg")


@dataclass(frozen=True)
class NliTable:
    path: Path
    sha256: str  # of the file's bytes: what a teacher store is tied to
    rows: list[tuple[str, str, str]]  # (sent0, sent1, hard_neg) per data row


def _header_index(header: list[str], path: Path) -> list[int]:
    missing = [c for c in NLI_COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{path}: line 1 (header) lacks column(s) {', '.join(missing)}; found {header}, "
            f"need {', '.join(NLI_COLUMNS)} (SimCSE nli_for_simcse.csv format)"
        )
    return [header.index(c) for c in NLI_COLUMNS]


def read_nli_csv(path: str | os.PathLike[str]) -> NliTable:
    """Read and check the whole CSV; raises DataError naming the file, line, row and column."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read NLI file {path}: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 (byte {e.start}): {e.reason}") from e
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path} is empty; expected a header {','.join(NLI_COLUMNS)} and rows")
    index = _header_index(header, path)
    rows: list[tuple[str, str, str]] = []
    try:
        for fields in reader:
            if not fields:  # a blank line (often the last one): no row
                continue
            if len(fields) != len(header):
                raise DataError(_field_count_message(path, reader.line_num, len(rows), header, fields))
            rows.append((fields[index[0]], fields[index[1]], fields[index[2]]))
    except csv.Error as e:  # e.g. an unterminated quote
        raise DataError(f"{path}: line {reader.line_num} (row {len(rows)}): malformed CSV: {e}") from e
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    return NliTable(path, hashlib.sha256(data).hexdigest(), rows)


def _field_count_message(path: Path, line: int, row: int, header: list[str], fields: list[str]) -> str:
    where = f"{path}: line {line} (row {row})"
    if len(fields) < len(header):
        absent = ", ".join(header[len(fields) :])
        return f"{where}: {len(fields)} field(s), expected {len(header)}; column(s) {absent} missing"
    return f"{where}: {len(fields)} fields, expected {len(header)} ({', '.join(header)}); unquoted comma?"


@dataclass(frozen=True)
class NliRecord:
    row: int  # data row in the CSV (0-based, header excluded), also the teacher-store row
    texts: tuple[str, str, str]  # sent0 (anchor), sent1 (positive), hard_neg (negative)
    teacher: np.ndarray | None  # (3, dim) float16 teacher embeddings of the three texts
    file: str


class NliSource:
    """Random-access NLI triplets, optionally joined with a verified teacher-embedding store.

    Args:
      csv_path: the NLI CSV.
      teacher_dir: the store written by ``python -m unime_jax.teacher`` for this CSV; None for no
        teacher embeddings (the teacher CLI itself reads the data this way).
      expect: extra manifest fields the store must have, e.g. ``{"dim": 4096, "teacher":
        "NV-Embed-v2"}``; the row count and data checksum are always checked.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike[str],
        teacher_dir: str | os.PathLike[str] | None = None,
        expect: Mapping[str, Any] | None = None,
    ) -> None:
        self._table: NliTable | None = read_nli_csv(csv_path)
        self.path = self._table.path
        self.sha256 = self._table.sha256
        self._length = len(self._table.rows)
        self.teacher_dir = None if teacher_dir is None else Path(teacher_dir)
        self._expect = {
            **(expect or {}),
            "rows": self._length,
            "data_sha256": self.sha256,
            "columns": NLI_COLUMNS,
        }
        self._teacher = self._open_teacher()

    def _open_teacher(self) -> np.memmap | None:
        if self.teacher_dir is None:
            return None
        return teacher_store.open_store(self.teacher_dir, self._expect, self.path)

    def __getstate__(self) -> dict[str, Any]:
        # Grain pickles the source into every worker: send paths, not 100 MB of strings and a
        # memmap (which would pickle as a full in-memory copy). Workers reload on first access.
        return {**self.__dict__, "_table": None, "_teacher": None}

    def _rows(self) -> list[tuple[str, str, str]]:
        if self._table is None:
            table = read_nli_csv(self.path)
            if table.sha256 != self.sha256:
                raise DataError(f"{self.path} changed while the pipeline was running; restart the run")
            self._table, self._teacher = table, self._open_teacher()
        return self._table.rows

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, row: int) -> NliRecord:
        texts = self._rows()[row]
        teacher = None if self._teacher is None else np.asarray(self._teacher[row])
        return NliRecord(row, texts, teacher, str(self.path))
