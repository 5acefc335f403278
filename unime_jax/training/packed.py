"""Embedding a packed batch (``unime_jax.data.packing``) inside the jitted step.

1. The vision tower runs on the real tiles only, ``tile_chunk`` tiles per shard at a time, for
   as many chunks as the batch fills; the features are a constant of the step (the packed layout
   needs a frozen tower, which UniME's recipe keeps).
2. Every length class runs its filled chunks: tokens and, for image rows, the rows' tile features
   are gathered per shard into a (rows, length) chunk, embedded, and scattered back to the rows'
   pooled positions. Chunks past the filled count are skipped (``lax.cond``), so the executed work
   follows the data while every shape stays fixed.
3. The pooled embeddings are split into roles in their original row order, for the unchanged loss.

With GradCache the loss gradient w.r.t. the embeddings is pulled back one chunk at a time, as
``training.gradcache`` does; otherwise the chunks are differentiated directly. Each chunk's
dropout key is derived from (step key, class, chunk), so both passes draw the same masks. Chunk
gathers and scatters keep the shard axis as a batch axis, so a chunk's rows stay on their device;
only the embeddings move, to the roles' order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from unime_jax.data.packing import PACKED_PREFIX
from unime_jax.training.gradcache import EmbedFn, LossFn

Batch = Mapping[str, jax.Array]
# (params, tiles (N, C, S, S)) -> per-tile features (N, per_tile, D)
TileFn = Callable[[Any, jax.Array], jax.Array]
# (params, length, per-row model inputs as keywords) -> (rows, length) rows of each row's own tile
# features, or (rows, length, taps) when each slot blends several (the model weighs them itself)
IndexFn = Callable[..., jax.Array]

_PLAN = PACKED_PREFIX + "plan_"
_ROW = PACKED_PREFIX + "row_"
_ROLE = PACKED_PREFIX + "role_"
_ROW_FIXED = ("start", "len", "tile")


def is_packed(batch: Batch) -> bool:
    return PACKED_PREFIX + "tokens" in batch


@dataclass(frozen=True)
class _Class:
    name: str
    image: bool
    length: int


def _classes(batch: Batch) -> list[_Class]:
    """Every class, from the plan keys (``packed_plan_text64``, ``packed_plan_image1024``)."""
    out = []
    for key in sorted(batch):
        if key.startswith(_PLAN):
            name = key[len(_PLAN) :]
            image = name.startswith("image")
            out.append(_Class(name, image, int(name[len("image" if image else "text") :])))
    return out


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """Per shard: x (S, N, ...) at index (S, ...) -> (S, ..., ...)."""
    return jax.vmap(lambda a, i: a[i])(x, index)


def _merge_shards(x: jax.Array) -> jax.Array:
    return x.reshape(-1, *x.shape[2:])


def roles(batch: Batch) -> list[str]:
    return [key[len(_ROLE) :] for key in sorted(batch) if key.startswith(_ROLE)]


def split_roles(pooled: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Pooled embeddings (S, R, dim) -> each role's (rows, dim), in the role's original row order."""
    out = {}
    for role in roles(batch):
        where = batch[_ROLE + role].reshape(-1, 2)  # (global shard, slot) per row
        out[role] = pooled[where[:, 0], where[:, 1]]
    return out


@dataclass(frozen=True)
class PackedEmbedder:
    """The packed layout's embedding passes for one model.

    Args:
      embed: (params, model inputs, dropout key) -> L2-normalised embeddings (the trainer's).
      tiles: (params, tiles) -> per-tile vision features; index: per-row feature layout. Both
        None for a text-only model.
      tile_chunk: tiles per shard per vision-tower chunk (the packer's).
    """

    embed: EmbedFn
    tiles: TileFn | None
    index: IndexFn | None
    tile_chunk: int

    # ------------------------------------------------------------------------------------------
    def tile_table(self, params: Any, batch: Batch) -> jax.Array | None:
        """Features of every shard's real tiles (S, tiles · per_tile, D), as constants; None without tiles."""
        if PACKED_PREFIX + "tiles" not in batch:
            return None
        if self.tiles is None:
            raise ValueError("this batch has image tiles but the model has no vision tower")
        tiles = batch[PACKED_PREFIX + "tiles"]
        s, capacity, size = tiles.shape[0], tiles.shape[1], self.tile_chunk
        chunk_shape = jax.ShapeDtypeStruct((s * size, *tiles.shape[2:]), tiles.dtype)
        per = jax.eval_shape(lambda t: self.tiles(params, t), chunk_shape)
        table = jnp.zeros((s, capacity * per.shape[1], per.shape[2]), per.dtype)
        filled = jnp.max(batch[PACKED_PREFIX + "tile_chunks"])

        def body(table: jax.Array, k: jax.Array) -> tuple[jax.Array, None]:
            def run(table: jax.Array) -> jax.Array:
                part = jax.lax.dynamic_slice_in_dim(tiles, k * size, size, axis=1)
                features = self.tiles(params, _merge_shards(part))
                features = features.reshape(s, size * per.shape[1], per.shape[2])
                return jax.lax.dynamic_update_slice_in_dim(table, features, k * size * per.shape[1], axis=1)

            return jax.lax.cond(k < filled, run, lambda t: t, table), None

        table, _ = jax.lax.scan(body, table, jnp.arange(capacity // size))
        return jax.lax.stop_gradient(table)

    def chunk_inputs(
        self, params: Any, batch: Batch, table: jax.Array | None, cls: _Class, slots: jax.Array
    ) -> dict[str, jax.Array]:
        """Model inputs (S·rows, ...) of one chunk; slots (S, rows) are pooled rows, -1 = empty."""
        rows = jnp.maximum(slots, 0)
        # An empty slot becomes a one-token row (finite, never read): its embedding is dropped.
        length = jnp.where(slots >= 0, _take(batch[_ROW + "len"], rows), 1)
        start = _take(batch[_ROW + "start"], rows)
        positions = start[..., None] + jnp.arange(cls.length)  # (S, rows, L)
        mask = jnp.arange(cls.length) < length[..., None]
        tokens = batch[PACKED_PREFIX + "tokens"]
        flat = jnp.minimum(positions, tokens.shape[1] - 1).reshape(positions.shape[0], -1)
        ids = jnp.where(mask, _take(tokens, flat).reshape(positions.shape), 0)
        inputs = {"input_ids": _merge_shards(ids), "attention_mask": _merge_shards(mask.astype(jnp.int32))}
        if not cls.image:
            return inputs
        extras = {
            key[len(_ROW) :]: _merge_shards(_take(batch[key], rows))
            for key in sorted(batch)
            if key.startswith(_ROW) and key[len(_ROW) :] not in _ROW_FIXED
        }
        per_tile = table.shape[1] // batch[PACKED_PREFIX + "tiles"].shape[1]
        index = self.index(params, cls.length, **extras)
        taps = index.shape[2:]  # (): one feature per slot; (k,): k blended features (LLaVA-OneVision)
        index = index.reshape(*positions.shape, *taps)
        first = _take(batch[_ROW + "tile"], rows) * per_tile
        first = first.reshape(*first.shape, *[1] * (index.ndim - first.ndim))
        at = (first + index).reshape(positions.shape[0], -1)
        gathered = _take(table, at).reshape(-1, cls.length, *taps, table.shape[-1])
        return inputs | extras | {"gathered_features": gathered}

    # ------------------------------------------------------------------------------------------
    def _scan_class(
        self,
        params: Any,
        batch: Batch,
        table: jax.Array | None,
        cls: _Class,
        key: jax.Array,
        carry: Any,
        update: Callable[[Any, dict[str, jax.Array], jax.Array, jax.Array], Any],
    ) -> Any:
        """carry = update(carry, inputs, slots, chunk key) over the class's filled chunks; the rest are skipped."""
        plan = batch[_PLAN + cls.name]
        filled = jnp.max(batch[PACKED_PREFIX + "chunks_" + cls.name])

        def body(carry: Any, k: jax.Array) -> tuple[Any, None]:
            def run(carry: Any) -> Any:
                slots = plan[:, k]
                inputs = self.chunk_inputs(params, batch, table, cls, slots)
                return update(carry, inputs, slots, jax.random.fold_in(key, k))

            return jax.lax.cond(k < filled, run, lambda c: c, carry), None

        carry, _ = jax.lax.scan(body, carry, jnp.arange(plan.shape[1]))
        return carry

    def embed_all(self, params: Any, batch: Batch, table: jax.Array | None, key: jax.Array) -> jax.Array:
        """Pooled embeddings (S, R, dim), zero for rows that are not there; differentiable w.r.t. params."""
        classes = _classes(batch)
        first = self.chunk_inputs(params, batch, table, classes[0], batch[_PLAN + classes[0].name][:, 0])
        shape = jax.eval_shape(self.embed, params, first, key)
        pooled = jnp.zeros((*batch[_ROW + "len"].shape, shape.shape[-1]), shape.dtype)

        def write(
            pooled: jax.Array, inputs: dict[str, jax.Array], slots: jax.Array, key: jax.Array
        ) -> jax.Array:
            out = self.embed(params, inputs, key).reshape(*slots.shape, -1)
            target = jnp.where(slots >= 0, slots, pooled.shape[1])  # empty slots point past the rows: dropped
            return jax.vmap(lambda p, i, v: p.at[i].set(v, mode="drop"))(pooled, target, out)

        for c, cls in enumerate(classes):
            pooled = self._scan_class(params, batch, table, cls, jax.random.fold_in(key, c), pooled, write)
        return pooled

    def pull_back(
        self, params: Any, batch: Batch, table: jax.Array | None, key: jax.Array, grads: jax.Array
    ) -> Any:
        """Sum over chunks of d(embeddings · grads)/d(params), one chunk's activations at a time (GradCache)."""

        def accumulate(acc: Any, inputs: dict[str, jax.Array], slots: jax.Array, key: jax.Array) -> Any:
            cached = _take(grads, jnp.maximum(slots, 0)) * (slots >= 0)[..., None]
            _, vjp = jax.vjp(lambda p: self.embed(p, inputs, key), params)
            (param_grads,) = vjp(_merge_shards(cached))
            return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, param_grads)

        # Accumulate in float32 even when parameters are bf16 (full fine-tuning).
        acc = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        for c, cls in enumerate(_classes(batch)):
            acc = self._scan_class(params, batch, table, cls, jax.random.fold_in(key, c), acc, accumulate)
        return acc

    def value_and_grad(
        self, loss_fn: LossFn, params: Any, batch: Batch, key: jax.Array, *, gradcache: bool
    ) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Any]:
        """((loss, metrics), grads) of the loss over the batch's roles."""
        table = self.tile_table(params, batch)
        if not gradcache:
            total = lambda p: loss_fn(split_roles(self.embed_all(p, batch, table, key), batch))  # noqa: E731
            return jax.value_and_grad(total, has_aux=True)(params)
        pooled = jax.lax.stop_gradient(self.embed_all(params, batch, table, key))
        pooled_loss = lambda e: loss_fn(split_roles(e, batch))  # noqa: E731
        (loss, metrics), pooled_grads = jax.value_and_grad(pooled_loss, has_aux=True)(pooled)
        return (loss, metrics), self.pull_back(params, batch, table, key, pooled_grads)
