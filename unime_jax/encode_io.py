"""The bulk-encode CLI's inputs and its resumable output (numpy, PIL and pyarrow only: no jax).

Inputs (:func:`open_table`): a JSONL file, a parquet file or a folder of images, read as a
:class:`Table` of rows with ids. Output (:class:`Output`): ``OUT`` (an (N, D) float32 .npy) and
its ids, one per line (:func:`ids_path`), built in ``OUT.unfinished/`` beside ``OUT``: the
embeddings as a memory-mapped .npy written chunk by chunk, the ids, and ``progress.json`` (rows
done, bad rows, the settings). A killed run leaves that folder and a rerun with the same settings
continues after its last finished chunk; when every row is done, both files are renamed into
place and the folder is removed, so ``OUT`` only ever appears complete.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "Columns",
    "InputProblem",
    "Output",
    "Row",
    "Table",
    "chunked",
    "ids_path",
    "open_table",
]

# Files an image folder's rows are made of (matched case-insensitively).
IMAGE_EXTENSIONS = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
_PARQUET_BATCH = 1024  # rows read from a parquet file at a time


class InputProblem(ValueError):
    """The input as a whole cannot be read (missing file, missing column, duplicate ids...)."""


@dataclass(frozen=True)
class Columns:
    """Field names of a JSONL record or parquet column names; ``id`` None: ids are line or row numbers."""

    text: str = "text"
    image: str = "image"
    id: str | None = None


@dataclass(frozen=True)
class Row:
    where: str  # for messages: "inputs.jsonl:3", "data.parquet row 7", "cats/1.png"
    text: str | None = None
    image: Path | bytes | None = None
    error: str | None = None  # why the row cannot be embedded: it becomes a NaN row

    def describe(self) -> str:
        """``where``, with the image's path when it has one."""
        return f"{self.where} (image {self.image})" if isinstance(self.image, Path) else self.where


class Table(Protocol):
    ids: list[str]  # one per row, unique
    known_bad: list[Row]  # rows found bad while opening the table (before any model runs)

    def rows(self, start: int) -> Iterator[Row]:
        """Rows ``start``, ``start + 1``, ... in order."""
        ...


def _make_row(where: str, text: Any, image: Any, image_root: Path, columns: Columns) -> Row:
    """A row whose text is a string or None and whose image is bytes or an existing file."""
    if text is not None and not isinstance(text, str):
        return Row(where, error=f"{columns.text!r} must be a string or null, got {text!r}")
    if isinstance(image, dict):  # HF datasets' image struct: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    image = image or None  # "" is MMEB's "no image"
    if image is not None and not isinstance(image, str | bytes):
        return Row(where, error=f"{columns.image!r} must be a path string, bytes or null, got {image!r}")
    if not text and not image:
        return Row(where, error=f"needs a non-empty {columns.text!r} or an {columns.image!r}")
    if isinstance(image, str):
        image = image_root / image
        if not image.is_file():
            return Row(where, error=f"image {image} does not exist")
    return Row(where, text or None, image)


def _id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InputProblem(f"{where}: an id must be a string or an integer, got {value!r}")
    return str(value)


def _write_ids(path: Path, ids: Sequence[str]) -> None:
    path.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


def _check_ids(ids: list[str], source: Path) -> list[str]:
    """Ids go one per line in the ids file and name rows: no line breaks, no duplicates."""
    seen: dict[str, int] = {}
    for row, value in enumerate(ids):
        if "\n" in value or "\r" in value:
            raise InputProblem(f"{source}: the id of row {row} holds a line break: {value!r}")
        if value in seen:
            raise InputProblem(f"{source}: rows {seen[value]} and {row} have the same id {value!r}")
        seen[value] = row
    return ids


class JsonlTable:
    """One JSON object per line; blank lines are skipped. Ids: ``columns.id`` or the line numbers."""

    def __init__(self, path: Path, image_root: Path, columns: Columns) -> None:
        self._rows: list[Row] = []
        ids: list[str] = []
        with path.open("rb") as file:  # bytes: a line that is not UTF-8 is one bad row, not a crash
            for number, raw in enumerate(file, start=1):
                parsed = self._parse(raw, f"{path}:{number}", image_root, columns)
                if parsed is None:
                    continue
                row, value = parsed
                self._rows.append(row)
                if columns.id is None:
                    ids.append(str(number))
                else:  # a bad line without a readable id gets a placeholder: its row is NaN
                    ids.append(f"<bad line {number}>" if value is None else value)
        self.ids = _check_ids(ids, path)
        self.known_bad = [row for row in self._rows if row.error]

    @staticmethod
    def _parse(raw: bytes, where: str, image_root: Path, columns: Columns) -> tuple[Row, str | None] | None:
        """The line's row and id (None without an id column or a readable id); None for a blank line."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return Row(
                where, error=f"not valid UTF-8: byte {raw[e.start]:#04x} at column {e.start + 1}"
            ), None
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return Row(where, error=f"not valid JSON: {e}"), None
        keys = [columns.text, columns.image] + ([columns.id] if columns.id else [])
        if not isinstance(record, dict):
            fields = ", ".join(f'"{key}": ...' for key in keys)
            return Row(where, error=f"expected a JSON object {{{fields}}}, got {line.strip()!r}"), None
        unknown = sorted(set(record) - set(keys))
        if unknown:
            return Row(where, error=f"unknown key(s) {unknown}; a row has {keys}"), None
        row = _make_row(where, record.get(columns.text), record.get(columns.image), image_root, columns)
        if columns.id is None:
            return row, None
        value = record.get(columns.id)
        if isinstance(value, bool) or not isinstance(value, str | int):
            return Row(
                where, error=f"the id {columns.id!r} must be a string or an integer, got {value!r}"
            ), None
        return row, str(value)

    def rows(self, start: int) -> Iterator[Row]:
        return iter(self._rows[start:])


class ParquetTable:
    """Rows of a parquet file, read as they are needed. Ids: ``columns.id`` or the row numbers.

    Each of the text and image columns may be missing (as long as one is there); an image is a
    path (relative to the image root), encoded bytes, or an HF ``{"bytes", "path"}`` struct.
    """

    def __init__(self, path: Path, image_root: Path, columns: Columns) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            self._file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise InputProblem(f"{path} is not a readable parquet file: {e}") from e
        names = set(self._file.schema_arrow.names)
        wanted = [c for c in (columns.text, columns.image, columns.id) if c is not None]
        present = [c for c in wanted if c in names]
        if columns.id is not None and columns.id not in names:
            raise InputProblem(f"{path} has no id column {columns.id!r}; its columns: {sorted(names)}")
        if not {columns.text, columns.image} & names:
            raise InputProblem(
                f"{path} has neither a {columns.text!r} nor an {columns.image!r} column (--text-column, "
                f"--image-column); its columns: {sorted(names)}"
            )
        self._path, self._image_root, self._columns = path, image_root, columns
        self._read = [c for c in present if c != columns.id]
        if columns.id is None:
            ids = [str(i) for i in range(self._file.metadata.num_rows)]
        else:
            values = self._file.read(columns=[columns.id]).column(columns.id).to_pylist()
            ids = [_id(v, f"{path} row {i}") for i, v in enumerate(values)]
        self.ids = _check_ids(ids, path)
        self.known_bad: list[Row] = []

    def rows(self, start: int) -> Iterator[Row]:
        # Skip whole row groups before `start` without reading them.
        metadata = self._file.metadata
        first, skipped = 0, 0
        while first < metadata.num_row_groups and skipped + metadata.row_group(first).num_rows <= start:
            skipped += metadata.row_group(first).num_rows
            first += 1
        groups = list(range(first, metadata.num_row_groups))
        index = skipped
        for batch in self._file.iter_batches(_PARQUET_BATCH, row_groups=groups, columns=self._read):
            for record in batch.to_pylist():
                if index >= start:
                    where = f"{self._path} row {index}"
                    text, image = record.get(self._columns.text), record.get(self._columns.image)
                    yield _make_row(where, text, image, self._image_root, self._columns)
                index += 1


class FolderTable:
    """Every image file under a folder (recursively, hidden ones left out), sorted; ids are their
    paths relative to the folder, with forward slashes."""

    def __init__(self, root: Path) -> None:
        files = sorted(
            path
            for path in root.rglob("*")
            if path.suffix.lower() in IMAGE_EXTENSIONS
            and path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(root).parts)
        )
        if not files:
            raise InputProblem(f"{root} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        self._files = files
        self.ids = _check_ids([path.relative_to(root).as_posix() for path in files], root)
        self.known_bad: list[Row] = []

    def rows(self, start: int) -> Iterator[Row]:
        for path, name in zip(self._files[start:], self.ids[start:], strict=True):
            yield Row(name, None, path)


def open_table(source: Path, image_root: Path | None, columns: Columns) -> Table:
    """The table of a folder, a ``.parquet`` file or (any other file) a JSONL file."""
    if source.is_dir():
        return FolderTable(source)
    if not source.is_file():
        raise InputProblem(f"input {source} does not exist")
    root = image_root or source.parent
    if source.suffix.lower() == ".parquet":
        return ParquetTable(source, root, columns)
    return JsonlTable(source, root, columns)


def chunked(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def ids_path(out: Path) -> Path:
    """Where the ids of ``out`` go: ``emb.npy`` -> ``emb.ids.txt``."""
    stem = out.stem if out.suffix == ".npy" else out.name
    return out.with_name(f"{stem}.ids.txt")


def _reserve(path: Path) -> None:
    """Claim the whole file's disk space now. A memory-mapped file is sparse: on a full disk a write
    into it would kill the process (SIGBUS) mid-run; reserving fails here with ENOSPC instead."""
    with open(path, "r+b") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve
                return
            raise OSError(
                e.errno,
                f"cannot reserve {os.fstat(file.fileno()).st_size} bytes for the embeddings ({e.strerror})",
                str(path),
            ) from e


def _fingerprint(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


class Output:
    """``out`` and its ids file, built in ``out.unfinished/`` (see the module docstring).

    :meth:`prepare` makes the folder and writes the ids (so an unwritable ``out`` fails before any
    model runs) or finds the unfinished run to resume; :meth:`open` maps the embeddings;
    :meth:`write` adds the next rows; :meth:`finish` renames into place; :meth:`discard` removes
    the folder.
    """

    def __init__(self, out: Path, ids: list[str], settings: dict[str, Any]) -> None:
        self.out = out
        self.work = out.with_name(out.name + ".unfinished")
        self.rows = len(ids)
        self.settings = {**settings, "ids_sha256": _fingerprint(ids), "rows": len(ids)}
        self.done = 0
        self.dim: int | None = None
        self.bad: dict[int, str] = {}
        self.resumed = False
        self._ids = ids
        self._embeddings: np.ndarray | None = None

    @property
    def _progress(self) -> Path:
        return self.work / "progress.json"

    @property
    def _array(self) -> Path:
        return self.work / "embeddings.npy"

    def prepare(self) -> str | None:
        """Make the work folder or pick up the unfinished run in it; returns a note for the user
        when an unfinished run with other settings was set aside. Raises OSError if unwritable."""
        if self.out.is_dir():
            raise IsADirectoryError(f"{self.out} is a directory; --out names the .npy file to write")
        note = None
        previous = self._read_progress()
        if previous is not None and previous["settings"] == self.settings:
            self.done, self.resumed = previous["done"], True
            self.bad = {int(k): v for k, v in previous["bad"].items()}
            if not (self.work / "ids.txt").is_file():  # a run killed while renaming into place
                _write_ids(self.work / "ids.txt", self._ids)
            return None
        if self.work.exists():
            note = (
                f"discarding the unfinished run in {self.work}: it was started with other settings or inputs"
            )
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        _write_ids(self.work / "ids.txt", self._ids)
        self._save_progress(dim=None)
        return note

    def _read_progress(self) -> dict[str, Any] | None:
        try:
            return json.loads(self._progress.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _save_progress(self, dim: int | None) -> None:
        state = {"settings": self.settings, "dim": dim, "done": self.done, "bad": self.bad}
        partial = self._progress.with_name("progress.json.tmp")
        partial.write_text(json.dumps(state), encoding="utf-8")
        os.replace(partial, self._progress)  # a kill leaves the old progress or the new, never half

    def open(self, dim: int) -> None:
        """Map the embeddings: the unfinished run's when it has the same shape, else a new array."""
        shape, self.dim = (self.rows, dim), dim
        if self.resumed and self._array.is_file():
            array = np.lib.format.open_memmap(self._array, mode="r+")
            if array.shape == shape and array.dtype == np.float32:
                self._embeddings = array
                return
        self.done, self.bad = 0, {}
        self._embeddings = np.lib.format.open_memmap(self._array, mode="w+", dtype=np.float32, shape=shape)
        _reserve(self._array)
        self._save_progress(dim)

    def write(self, embeddings: np.ndarray, bad: dict[int, str]) -> None:
        """The next ``len(embeddings)`` rows (NaN where bad) and their bad rows' messages, by position."""
        assert self._embeddings is not None, "open() first"
        start, stop = self.done, self.done + len(embeddings)
        self._embeddings[start:stop] = embeddings
        self._embeddings.flush()  # the rows are on disk before progress.json says they are done
        self.done = stop
        self.bad |= {start + i: message for i, message in bad.items()}
        self._save_progress(embeddings.shape[1])

    def finish(self) -> Path:
        """Rename the embeddings to ``out`` and the ids beside it; returns the ids file."""
        assert self._embeddings is not None and self.done == self.rows
        self._embeddings.flush()
        self._embeddings = None
        ids = ids_path(self.out)
        os.replace(self.work / "ids.txt", ids)
        os.replace(self._array, self.out)
        shutil.rmtree(self.work)
        return ids

    def discard(self) -> None:
        self._embeddings = None
        shutil.rmtree(self.work, ignore_errors=True)
