"""Embedding an evaluation's items with a :class:`~unime_jax.embedder.UniME`, resumably, on every
device of every process.

The items are cut into the store's chunks; chunk ``c`` belongs to process ``c % process_count``,
which loads it from the store or encodes it on its local devices (batch rows split over them) and
saves it. The chunks to encode go through one :meth:`~unime_jax.embedder.UniME.encode_stream`, so
the next chunk is prepared while the device runs this one. With several processes, the chunks are
then all-gathered, so every process ends with every embedding. An item that cannot be embedded (a
missing or corrupt image, an empty input) gets a NaN row and its error message; the rest of its
chunk is embedded normally.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from unime_jax.embedder import BadInput, ImageSource, Row, UniME
from unime_jax.eval.store import EmbeddingStore
from unime_jax.progress import progress_bar

__all__ = ["Entry", "agree", "encode_entries"]


@dataclass(frozen=True)
class Entry:
    """One input: a text and/or an image (a source, or a function that returns one when needed)."""

    text: str | None
    image: ImageSource | Callable[[], ImageSource] | None = None

    def source(self) -> ImageSource | None:
        return self.image() if callable(self.image) else self.image


def _row(entry: Entry) -> Row:
    try:
        return entry.text, entry.source()
    except (OSError, ValueError) as e:  # a lazily read source (e.g. a parquet row) failed
        return BadInput(f"cannot read the image: {e}")


def _encode_chunks(
    model: UniME,
    chunks: Sequence[Sequence[Entry]],
    raw: bool,
    batch_size: int,
    on_rows: Callable[[int], None],
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Each chunk's embeddings (NaN rows where an entry failed) and per-entry errors, in order."""
    rows = ([_row(entry) for entry in chunk] for chunk in chunks)
    for chunk, encoded in zip(
        chunks,
        model.encode_stream(rows, raw=raw, batch_size=batch_size, skip_bad=True, on_rows=on_rows),
        strict=True,
    ):
        yield encoded.embeddings, [encoded.errors.get(i, "") for i in range(len(chunk))]


def agree(flag: bool) -> bool:
    """Process 0's value of ``flag`` on every process (so that all take the same branch)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def _allgather_errors(errors: dict[int, str]) -> dict[int, str]:
    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps(errors).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([payload.size]))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: payload.size] = payload
    gathered = multihost_utils.process_allgather(padded)
    merged: dict[int, str] = {}
    for row, size in zip(gathered, np.ravel(sizes), strict=True):
        merged |= {int(k): v for k, v in json.loads(bytes(row[: int(size)]).decode()).items()}
    return merged


def _allgather(
    local: dict[int, tuple[np.ndarray, list[str]]], store: EmbeddingStore, dim: int
) -> tuple[np.ndarray, list[str]]:
    """Every process's chunks on every process: one all-gather of equal-shaped blocks."""
    from jax.experimental import multihost_utils

    count = jax.process_count()
    per_process = -(-store.num_chunks // count)
    block = np.full((max(per_process, 1), store.chunk_size, dim), np.nan, np.float32)
    errors: dict[int, str] = {}
    for chunk, (embeddings, chunk_errors) in local.items():
        block[chunk // count, : len(embeddings)] = embeddings
        start = store.bounds(chunk)[0]
        errors |= {start + i: e for i, e in enumerate(chunk_errors) if e}
    gathered = multihost_utils.process_allgather(block)  # (process, slot, row, dim)
    out = np.empty((store.num_items, dim), np.float32)
    for chunk in range(store.num_chunks):
        start, stop = store.bounds(chunk)
        out[start:stop] = gathered[chunk % count, chunk // count, : stop - start]
    merged = _allgather_errors(errors)
    return out, [merged.get(i, "") for i in range(store.num_items)]


def encode_entries(
    model: UniME,
    entries: Sequence[Entry],
    store: EmbeddingStore,
    *,
    raw: bool,
    batch_size: int,
    desc: str,
    progress: bool = True,
) -> tuple[np.ndarray, list[str]]:
    """(N, D) float32 embeddings of ``entries`` (NaN rows where an item failed) and per-item errors.

    ``raw``: feed the texts exactly as given (MMEB) rather than in UniME's prompt templates.
    """
    if len(entries) != store.num_items:
        raise ValueError(f"{len(entries)} entries for a store of {store.num_items} items")
    process, count = jax.process_index(), jax.process_count()
    mine = [chunk for chunk in range(store.num_chunks) if chunk % count == process]
    total = sum(stop - start for start, stop in map(store.bounds, mine))
    local: dict[int, tuple[np.ndarray, list[str]]] = {}
    with progress_bar(total=total, desc=desc, unit="item", disable=not progress or process != 0) as bar:
        todo = []
        for chunk in mine:
            loaded = store.load(chunk)
            if loaded is None:
                todo.append(chunk)
                continue
            local[chunk] = loaded
            bar.update(len(loaded[0]))
        slices = [entries[slice(*store.bounds(chunk))] for chunk in todo]
        for chunk, encoded in zip(
            todo, _encode_chunks(model, slices, raw, batch_size, bar.update), strict=True
        ):
            store.save(chunk, *encoded)  # saved as it finishes: an interrupted run resumes from here
            local[chunk] = encoded
    if count > 1:
        return _allgather(local, store, model.dim)
    if not local:
        return np.zeros((0, model.dim), np.float32), []
    return np.concatenate([local[c][0] for c in mine]), [e for c in mine for e in local[c][1]]
