"""A resumable on-disk store of one item list's embeddings, written chunk by chunk.

Layout of a store directory::

    manifest.json        {"identity": {...}, "num_items": N, "chunk_size": C}
    chunk-00000.npz      embeddings (n, D) float32 (NaN rows: items that failed) and errors (n,) str

Every chunk file appears atomically (written to a temporary name, then renamed), so a run killed
at any moment leaves only whole chunks, and the next run encodes the missing ones. A store whose
manifest differs from what the run would write (another model, other settings, changed data) is
refused with the differing key named: its embeddings would silently mix two setups.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unime_jax.atomic import process_partial_path
from unime_jax.atomic import write_text as atomic_write_text

__all__ = ["EmbeddingStore", "StoreMismatch", "atomic_write_text", "first_difference"]

_MANIFEST = "manifest.json"


class StoreMismatch(ValueError):
    """An existing store or run directory was written with other settings."""

    exit_code = 1  # an intended refusal whose message says what to do (unime_jax.cli_errors)


def first_difference(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> str | None:
    """The dotted key of the first difference between two JSON objects, with both values; None if equal."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} was {json.dumps(a)}, now {json.dumps(b)}"
    return None


class EmbeddingStore:
    """Chunks of ``chunk_size`` consecutive items of a fixed item list, each saved once.

    Args:
      directory: where the manifest and chunks live (created).
      identity: JSON-serialisable description of what is embedded and how (model, settings, the
        item list's digest); it must equal the stored one to resume.
      num_items, chunk_size: the list's length and the chunking.
    """

    def __init__(self, directory: Path, identity: dict[str, Any], num_items: int, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.directory = Path(directory)
        self.num_items = num_items
        self.chunk_size = chunk_size
        manifest = {"identity": identity, "num_items": num_items, "chunk_size": chunk_size}
        path = self.directory / _MANIFEST
        if path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                stored = None  # unreadable: the chunks cannot be trusted either; start over
            if stored is not None and (difference := first_difference(stored, manifest)):
                raise StoreMismatch(
                    f"{path}: {difference}; these embeddings belong to another run: use a new --out, "
                    f"or delete {self.directory} to recompute them"
                )
            if stored is None:
                for chunk in self.directory.glob("chunk-*.npz"):
                    chunk.unlink()
        atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")

    @property
    def num_chunks(self) -> int:
        return -(-self.num_items // self.chunk_size)

    def bounds(self, chunk: int) -> tuple[int, int]:
        """Item range [start, stop) of a chunk."""
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.num_items)

    def _path(self, chunk: int) -> Path:
        return self.directory / f"chunk-{chunk:05d}.npz"

    def load(self, chunk: int) -> tuple[np.ndarray, list[str]] | None:
        """A saved chunk's embeddings and per-item errors ("" = fine); None if it is not (wholly) there."""
        path = self._path(chunk)
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                embeddings, errors = data["embeddings"], [str(e) for e in data["errors"]]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None  # damaged on disk (the writes themselves are atomic): encode it again
        start, stop = self.bounds(chunk)
        if embeddings.shape[0] != stop - start or len(errors) != stop - start:
            return None
        return embeddings, errors

    def save(self, chunk: int, embeddings: np.ndarray, errors: list[str]) -> None:
        start, stop = self.bounds(chunk)
        if embeddings.shape[0] != stop - start or len(errors) != stop - start:
            raise ValueError(f"chunk {chunk} holds items [{start}, {stop}), got {embeddings.shape[0]} rows")
        path = self._path(chunk)
        partial = process_partial_path(path)
        with partial.open("wb") as handle:
            np.savez(handle, embeddings=embeddings.astype(np.float32), errors=np.asarray(errors, dtype=str))
        os.replace(partial, path)
