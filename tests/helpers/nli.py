"""NLI CSV files and teacher stores written the way the teacher CLI leaves them."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from unime_jax.data import teacher_store
from unime_jax.data.nli import NLI_COLUMNS, NliSource


def write_nli_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = NLI_COLUMNS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def triplets(n: int) -> list[list[str]]:
    return [
        [f"A man {i} plays a guitar, on stage.", f"A person {i} makes music.", f"Nobody {i} plays."]
        for i in range(n)
    ]


def write_store(directory: Path, source: NliSource, dim: int = 8, **fields: object) -> np.ndarray:
    """A complete store with random unit vectors, as the teacher CLI would leave it."""
    manifest = teacher_store.TeacherManifest(
        teacher="fake-teacher",
        dim=dim,
        instruction="",
        rows=len(source),
        data_sha256=source.sha256,
        data_file=source.path.name,
        columns=NLI_COLUMNS,
    )
    manifest = dataclasses.replace(manifest, **fields)
    embeddings = teacher_store.create_store(directory, manifest)
    vectors = np.random.default_rng(0).normal(size=embeddings.shape)
    embeddings[:] = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    embeddings.flush()
    teacher_store.write_manifest(directory, dataclasses.replace(manifest, rows_done=manifest.rows))
    return np.asarray(embeddings)
