"""The packed batch layout: rows regrouped by modality and length class, real tiles only.

A padded batch gives every row the worst-case shape (e.g. 3184 tokens and 5 CLIP tiles for a
48-token text target). Embeddings are independent per row, so the rows of all embedded roles
(queries, targets, negatives) can instead be pooled and run in groups of like rows:

- text rows and image rows go to separate *length classes* (the featurizer's length buckets);
  a class's chunks have a fixed shape (``rows`` × ``length`` tokens, ``rows`` chosen so that a
  chunk holds about ``chunk_tokens`` tokens), so a few shapes serve every batch;
- image rows carry only their real tiles, packed into one tile buffer with each row's offset;
  text rows carry none;
- how many chunks of each class a batch fills is data (``packed_chunks_<class>``); the step runs
  that many and skips the rest (``training.packed``);
- the slots a class's run chunks would leave empty take shorter rows of the same kind (they cost
  nothing more there, and may spare a chunk of their own class).

Sorted by class, the pooled rows are dealt round-robin over the process's batch shards (the
devices along the mesh's data axes), so that every shard holds the same number of rows and
each class's rows split evenly: the shards run their chunks in lockstep. Each role row records
where it went, and the engine gathers the embeddings back into the roles' original order (an
all-gather of embeddings, which the loss over the global batch needs anyway). Buffers are sized
for the worst case, so every batch has the same shapes.

Packed keys (S = batch shards of this process, R = rows per shard):
  packed_tokens         (S, cap) int32      each shard's rows' real tokens, back to back
  packed_row_start      (S, R) int32        where a row's tokens start in packed_tokens
  packed_row_len        (S, R) int32        its real length (0: no row)
  packed_row_tile       (S, R) int32        where its tiles start in packed_tiles
  packed_row_<name>     (S, R, ...)         per-row model inputs (e.g. image_sizes)
  packed_tiles          (S, tiles, ...)     real tiles back to back (only with image classes)
  packed_tile_chunks    (S,) int32          CLIP chunks of ``tile_chunk`` tiles that hold them
  packed_plan_<class>   (S, chunks, rows)   pooled row of every chunk slot, -1 = empty
  packed_chunks_<class> (S,) int32          chunks of the class this batch fills
  packed_role_<role>    (S, n, 2) int32     (global shard, slot) of the role's rows, in row order
Every other key of the batch (teacher embeddings, target ids) is kept as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PACKED_PREFIX", "PackClass", "PackSpec", "pack_batch", "pack_classes", "packed_lengths"]

PACKED_PREFIX = "packed_"
_MASK = "_attention_mask"


@dataclass(frozen=True)
class PackClass:
    """One chunk shape: rows of one kind up to ``length`` tokens, ``rows`` per shard per chunk."""

    kind: str  # "text" or "image"
    length: int
    rows: int

    @property
    def name(self) -> str:
        return f"{self.kind}{self.length}"


def packed_lengths(max_len: int, smallest: int = 8) -> tuple[int, ...]:
    """Class lengths up to ``max_len``: 8 steps of ``smallest`` tokens, then the step doubles every
    8 steps up to 256 (``smallest`` 8: steps of 8 to 64, 16 to 128, 32 to 256, ... 256 from 1024).

    A row pads to at most about 1.14× its length (less for most), where the embedder's 1.5× buckets
    would cost up to 1.5×; more classes mean more compiled chunk shapes, so the steps grow with length.
    """
    lengths, size, step = [], smallest, smallest
    while size < max_len:
        lengths.append(size)
        if size >= 8 * step and step < 256:
            step *= 2
        size += step
    return (*lengths, max_len)


def pack_classes(
    text_lengths: Sequence[int], image_lengths: Sequence[int], chunk_tokens: int, max_rows: int
) -> tuple[PackClass, ...]:
    """Classes for the given padded lengths; a chunk holds up to ``chunk_tokens`` tokens and
    ``max_rows`` rows per shard (short rows get small chunks, so a half-filled one wastes little)."""
    if chunk_tokens < 1 or max_rows < 1:
        raise ValueError(f"chunk_tokens and max_rows must be positive, got {chunk_tokens}, {max_rows}")

    def rows(length: int) -> int:
        return max(1, min(max_rows, chunk_tokens // length))

    return tuple(PackClass("text", n, rows(n)) for n in text_lengths) + tuple(
        PackClass("image", n, rows(n)) for n in image_lengths
    )


@dataclass(frozen=True)
class PackSpec:
    """What the packer needs to know, fixed for a run (it travels to grain workers).

    Args:
      classes: the chunk shapes (:func:`pack_classes`).
      shards: batch shards of this process (devices along the mesh's data axes, per process).
      extras: per-row model inputs to carry besides tokens and pixels (e.g. ``image_sizes``).
      tile_chunk: tiles per shard per vision-tower chunk.
      roles: the roles to embed; empty = every role in the batch.
      first_shard: global index of this process's first shard (process index × shards).
    """

    classes: tuple[PackClass, ...]
    shards: int = 1
    extras: tuple[str, ...] = ()
    tile_chunk: int = 8
    roles: tuple[str, ...] = ()
    first_shard: int = 0

    def __post_init__(self) -> None:
        if self.shards < 1 or self.tile_chunk < 1:
            raise ValueError(f"shards and tile_chunk must be positive, got {self.shards}, {self.tile_chunk}")
        for kind in ("text", "image"):
            lengths = [c.length for c in self.classes if c.kind == kind]
            if lengths != sorted(set(lengths)):
                raise ValueError(f"{kind} class lengths must be increasing, got {lengths}")


def _found_roles(batch: dict[str, np.ndarray]) -> list[str]:
    return sorted(key[: -len(_MASK)] for key in batch if key.endswith(_MASK))


def _roles(batch: dict[str, np.ndarray], spec: PackSpec) -> list[str]:
    found = _found_roles(batch)
    if not spec.roles:
        return found
    missing = [role for role in spec.roles if role not in found]
    if missing:
        raise KeyError(f"the batch has no {missing[0]}{_MASK}; its roles are {found}")
    return list(spec.roles)


def _flat(x: np.ndarray, lead: int) -> np.ndarray:
    """(B, [k,] ...) -> (B*k, ...): a role with a (rows, k) lead (mined negatives) becomes rows*k rows."""
    return x.reshape(-1, *x.shape[lead:])


@dataclass
class _Rows:
    """One role's rows, flattened."""

    ids: np.ndarray  # (n, L)
    lengths: np.ndarray  # (n,)
    tiles: np.ndarray | None  # (n, P, ...) pixel tiles
    num_tiles: np.ndarray  # (n,)
    extras: dict[str, np.ndarray]


def _role_rows(batch: dict[str, np.ndarray], role: str, spec: PackSpec) -> _Rows:
    mask = batch[role + _MASK]
    lead = mask.ndim - 1
    n = math.prod(mask.shape[:lead])
    tiles = batch.get(f"{role}_pixel_values")
    num_tiles = batch.get(f"{role}_num_tiles")
    if tiles is not None and num_tiles is None:
        raise KeyError(
            f"the batch has {role}_pixel_values but no {role}_num_tiles (the featurizer's real tile counts)"
        )
    return _Rows(
        ids=_flat(batch[f"{role}_input_ids"], lead),
        lengths=_flat(mask, lead).sum(axis=-1).astype(np.int32),
        tiles=None if tiles is None else _flat(tiles, lead),
        num_tiles=np.zeros(n, np.int32) if num_tiles is None else _flat(num_tiles, lead).astype(np.int32),
        extras={
            name: _flat(batch[f"{role}_{name}"], lead) for name in spec.extras if f"{role}_{name}" in batch
        },
    )


def _class_of(length: int, image: bool, classes: Sequence[PackClass]) -> int:
    kind = "image" if image else "text"
    for i, cls in enumerate(classes):
        if cls.kind == kind and length <= cls.length:
            return i
    longest = max((c.length for c in classes if c.kind == kind), default=0)
    raise ValueError(
        f"a {kind} row of {length} tokens fits no packed {kind} class (the longest is {longest}); "
        "the layout's lengths must cover the featurizer's seq_len"
    )


def _fill_empty_slots(classes: np.ndarray, spec: PackSpec) -> np.ndarray:
    """Rows moved up into the slots that longer classes' chunks would run empty; classes (S, R).

    Every shard runs a class's chunks as often as the fullest shard does (lockstep), and an empty
    slot of a chunk costs as much as a full one. A shorter row of the same kind placed there costs
    nothing more (right padding leaves its embedding unchanged) and may spare a chunk of its own
    class, so executed work never grows. Longest classes first; each takes the longest shorter rows.
    """
    classes = classes.copy()
    for kind in ("text", "image"):
        ids = sorted(
            (i for i, c in enumerate(spec.classes) if c.kind == kind), key=lambda i: -spec.classes[i].length
        )
        for at, c in enumerate(ids):
            counts = (classes == c).sum(axis=1)
            run = math.ceil(counts.max() / spec.classes[c].rows) * spec.classes[c].rows
            for d, free in enumerate(run - counts):
                for shorter in ids[at + 1 :]:
                    moved = np.flatnonzero(classes[d] == shorter)[:free]
                    classes[d, moved] = c
                    free -= len(moved)
    return classes


def _plans(classes: np.ndarray, spec: PackSpec) -> dict[str, np.ndarray]:
    """Each class's chunk slots per shard (-1 = empty) and how many chunks it fills; classes (S, R)."""
    out = {}
    s, pool = classes.shape
    for c, cls in enumerate(spec.classes):
        plan = np.full((s, math.ceil(pool / cls.rows), cls.rows), -1, np.int32)
        counts = np.zeros(s, np.int32)
        for d in range(s):
            slots = np.flatnonzero(classes[d] == c).astype(np.int32)
            plan[d].reshape(-1)[: len(slots)] = slots
            counts[d] = math.ceil(len(slots) / cls.rows)
        out[f"{PACKED_PREFIX}plan_{cls.name}"] = plan
        out[f"{PACKED_PREFIX}chunks_{cls.name}"] = counts
    return out


def pack_batch(batch: dict[str, np.ndarray], spec: PackSpec) -> dict[str, np.ndarray]:
    """A stacked padded batch -> the packed layout (module docstring); deterministic in the batch."""
    rows = {role: _role_rows(batch, role, spec) for role in _roles(batch, spec)}
    s = spec.shards
    for role, r in rows.items():
        if len(r.lengths) % s:
            raise ValueError(f"{len(r.lengths)} {role} rows do not split over {s} batch shards")
    pooled = [(role, i) for role, r in rows.items() for i in range(len(r.lengths))]
    per_shard = len(pooled) // s
    token_cap = per_shard * max(r.ids.shape[-1] for r in rows.values())
    # Without image classes (text-only data) the zero tile slots of image-capable roles stay behind.
    images = any(c.kind == "image" for c in spec.classes)
    pixels = next((r.tiles for r in rows.values() if r.tiles is not None), None) if images else None
    tile_cap = (
        0
        if pixels is None
        else per_shard * max(r.tiles.shape[1] for r in rows.values() if r.tiles is not None)
    )
    tile_cap = math.ceil(tile_cap / spec.tile_chunk) * spec.tile_chunk

    # Like rows side by side: sorted by class, then dealt round-robin over the shards, so that every
    # shard has the same number of rows and each class's rows split evenly (chunks run in lockstep).
    row_class = [
        _class_of(int(rows[role].lengths[i]), int(rows[role].num_tiles[i]) > 0, spec.classes)
        for role, i in pooled
    ]
    order = sorted(range(len(pooled)), key=lambda j: row_class[j])
    tokens = np.zeros((s, token_cap), np.int32)
    start, length, tile_at, classes = (np.zeros((s, per_shard), np.int32) for _ in range(4))
    extras = {
        name: np.zeros((s, per_shard, *value.shape[1:]), value.dtype)
        for r in rows.values()
        for name, value in r.extras.items()
    }
    tiles = None if pixels is None else np.zeros((s, tile_cap, *pixels.shape[2:]), pixels.dtype)
    token_end, tile_end = np.zeros(s, np.int64), np.zeros(s, np.int64)
    where = {role: np.zeros((len(r.lengths), 2), np.int32) for role, r in rows.items()}
    for rank, j in enumerate(order):
        (role, i), d, slot = pooled[j], rank % s, rank // s
        r = rows[role]
        size, count, at, tile = int(r.lengths[i]), int(r.num_tiles[i]), int(token_end[d]), int(tile_end[d])
        tokens[d, at : at + size] = r.ids[i, :size]
        start[d, slot], length[d, slot], tile_at[d, slot], classes[d, slot] = at, size, tile, row_class[j]
        if count:
            tiles[d, tile : tile + count] = r.tiles[i, :count]
        for name, value in r.extras.items():
            extras[name][d, slot] = value[i]
        where[role][i] = (spec.first_shard + d, slot)
        token_end[d], tile_end[d] = at + size, tile + count

    # Model inputs of every role leave (also of roles not embedded); loss inputs such as target_ids stay.
    inputs = ("input_ids", "attention_mask", "pixel_values", "num_tiles", *spec.extras)
    dropped = {f"{role}_{name}" for role in _found_roles(batch) for name in inputs}
    out = {key: value for key, value in batch.items() if key not in dropped}
    out |= {
        f"{PACKED_PREFIX}tokens": tokens,
        f"{PACKED_PREFIX}row_start": start,
        f"{PACKED_PREFIX}row_len": length,
        f"{PACKED_PREFIX}row_tile": tile_at,
        **{f"{PACKED_PREFIX}row_{name}": value for name, value in extras.items()},
        # (global shard, slot) of each role row, stored (S, rows / S, 2) so processes concatenate in order.
        **{f"{PACKED_PREFIX}role_{role}": value.reshape(s, -1, 2) for role, value in where.items()},
    }
    if tiles is not None:
        out[f"{PACKED_PREFIX}tiles"] = tiles
        out[f"{PACKED_PREFIX}tile_chunks"] = np.ceil(tile_end / spec.tile_chunk).astype(np.int32)
    return out | _plans(_fill_empty_slots(classes, spec), spec)
