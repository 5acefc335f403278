"""Teacher-embedding store: a float16 (rows, columns, dim) ``.npy`` memmap plus a JSON manifest.

Layout of a store directory::

    manifest.json     what the embeddings are (teacher, dim, instruction, data checksum) and how
                      many rows are done; rewritten atomically after every flushed chunk
    embeddings.npy    float16 (rows, len(columns), dim), L2-normalised rows, memory-mapped

The manifest ties the store to one exact data file (sha256 of its bytes): a store computed for
another file, teacher, instruction or dimension is refused with the field that differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unime_jax.data.errors import DataError, read_json_object

__all__ = [
    "EMBEDDINGS_FILE",
    "MANIFEST_FILE",
    "TeacherManifest",
    "check_job",
    "create_store",
    "manifest_mismatches",
    "open_store",
    "read_manifest",
    "resume_store",
    "write_manifest",
]

MANIFEST_FILE = "manifest.json"
EMBEDDINGS_FILE = "embeddings.npy"
FORMAT = "unime-teacher-embeddings/1"
DTYPE = np.float16


@dataclass(frozen=True)
class TeacherManifest:
    teacher: str  # teacher model name, e.g. NV-Embed-v2
    dim: int  # embedding dimension
    instruction: str  # prompt prepended to every text before encoding ("" for none)
    rows: int  # data rows; the store holds one (columns, dim) block per row
    data_sha256: str  # sha256 of the data file's bytes
    data_file: str  # the data file's name, for messages only
    columns: tuple[str, ...]  # data columns, in the store's second axis order
    rows_done: int = 0  # rows embedded and flushed so far (== rows when complete)
    dtype: str = "float16"
    normalized: bool = True
    format: str = FORMAT

    @property
    def complete(self) -> bool:
        return self.rows_done == self.rows

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.rows, len(self.columns), self.dim)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "columns": list(self.columns)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: Path) -> TeacherManifest:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names - data.keys() if n not in _DEFAULTED)
        if missing:
            raise DataError(
                f"teacher manifest {path} lacks field(s) {', '.join(missing)}; recompute the store"
            )
        if data.get("format", FORMAT) != FORMAT:
            raise DataError(
                f"teacher manifest {path} has format {data['format']!r}, this code reads {FORMAT!r}"
            )
        return cls(**{k: v for k, v in data.items() if k in names} | {"columns": tuple(data["columns"])})


_DEFAULTED = {f.name for f in dataclasses.fields(TeacherManifest) if f.default is not dataclasses.MISSING}
# Fields that identify what was computed; rows_done is progress, dtype/format are checked on open.
_IDENTITY = ("teacher", "dim", "instruction", "rows", "data_sha256", "columns", "normalized")


def read_manifest(store: str | os.PathLike[str]) -> TeacherManifest:
    path = Path(store) / MANIFEST_FILE
    data = read_json_object(path, "teacher store", "compute it with python -m unime_jax.teacher")
    return TeacherManifest.from_json(data, path)


def write_manifest(store: str | os.PathLike[str], manifest: TeacherManifest) -> None:
    """Replace the manifest atomically: a crash leaves the old or the new one, never half of one."""
    path = Path(store) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def manifest_mismatches(found: TeacherManifest, expected: Mapping[str, Any]) -> list[str]:
    """One line per field of `expected` that `found` disagrees with: ``field: expected X, found Y``."""
    lines = []
    for field, want in expected.items():
        have = getattr(found, field)
        if have != want:
            lines.append(f"  {field}: expected {_show(want)}, found {_show(have)}")
    return lines


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def create_store(store: str | os.PathLike[str], manifest: TeacherManifest) -> np.memmap:
    """A new store with `manifest.rows_done` == 0; returns the writable embeddings memmap."""
    directory = Path(store)
    directory.mkdir(parents=True, exist_ok=True)
    embeddings = np.lib.format.open_memmap(
        directory / EMBEDDINGS_FILE, mode="w+", dtype=DTYPE, shape=manifest.shape
    )
    write_manifest(directory, dataclasses.replace(manifest, rows_done=0))
    return embeddings


def _embeddings(store: Path, manifest: TeacherManifest, mode: str) -> np.memmap:
    path = store / EMBEDDINGS_FILE
    try:
        embeddings = np.load(path, mmap_mode=mode)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot open teacher embeddings {path}: {e}; recompute the store") from e
    if embeddings.shape != manifest.shape or embeddings.dtype != DTYPE:
        raise DataError(
            f"teacher embeddings {path} are {embeddings.dtype}{embeddings.shape}, the manifest says "
            f"float16{manifest.shape}; the store is damaged, recompute it"
        )
    return embeddings


def _recompute_hint(
    directory: Path, found: TeacherManifest, expected: Mapping[str, Any], data_file: str | os.PathLike[str]
) -> str:
    """The commands that work: the teacher CLI never overwrites a store made for other data, so the
    new one goes to a new directory, which the run config then names."""
    new = directory.with_name(f"{directory.name}-{str(expected.get('data_sha256', 'new'))[:8]}")
    instruction = expected.get("instruction", found.instruction)
    flags = f" --instruction {json.dumps(instruction)}" if instruction else ""
    return (
        f"Compute a store for it in a new directory (TEACHER: the sentence-transformers model, "
        f"{expected.get('teacher', found.teacher)} here):\n"
        f"  python -m unime_jax.teacher --model TEACHER --data {data_file} --out {new}{flags}\n"
        f"then train with --set data.nli.teacher_dir={new} (or delete {directory} and compute it there)."
    )


def check_job(
    store: str | os.PathLike[str],
    found: TeacherManifest,
    expected: TeacherManifest,
    skip: tuple[str, ...] = (),
) -> None:
    """Refuse to continue `store` unless it was started for the same job (fields in `skip` aside)."""
    wrong = manifest_mismatches(found, {f: getattr(expected, f) for f in _IDENTITY if f not in skip})
    if wrong:
        raise DataError(
            f"{Path(store) / MANIFEST_FILE} was computed for a different job:\n"
            + "\n".join(wrong)
            + "\nUse another --out directory, or delete this one to start over."
        )


def resume_store(
    store: str | os.PathLike[str], expected: TeacherManifest
) -> tuple[TeacherManifest, np.memmap]:
    """Reopen a partly (or fully) computed store for writing, after checking it is the same job."""
    found = read_manifest(store)
    check_job(store, found, expected)
    return found, _embeddings(Path(store), found, "r+")


def open_store(
    store: str | os.PathLike[str], expected: Mapping[str, Any], data_file: str | os.PathLike[str]
) -> np.memmap:
    """Open a complete store read-only, refusing it when any field in `expected` differs.

    Args:
      store: the store directory.
      expected: manifest field → required value (at least ``rows`` and ``data_sha256``).
      data_file: the data file the store must belong to (named in error messages).
    """
    directory = Path(store)
    manifest = read_manifest(directory)
    wrong = manifest_mismatches(manifest, expected)
    if wrong:
        raise DataError(
            f"teacher store {directory / MANIFEST_FILE} does not match {data_file}:\n"
            + "\n".join(wrong)
            + "\n"
            + _recompute_hint(directory, manifest, expected, data_file)
        )
    if not manifest.complete:
        raise DataError(
            f"teacher store {directory} is incomplete ({manifest.rows_done} of {manifest.rows} rows); "
            "rerun python -m unime_jax.teacher with the same arguments to finish it"
        )
    return _embeddings(directory, manifest, "r")
