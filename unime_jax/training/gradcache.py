"""GradCache inside one jitted step (Gao et al. 2021), as VLM2Vec/UniME use it for batch 1024.

1. Embed every group (queries, targets, ...) chunk by chunk without gradients.
2. Compute the loss on the full (global) batch of embeddings and its gradient w.r.t. them.
3. Recompute each chunk under `jax.vjp` and pull the cached embedding gradient back into the
   parameters, accumulating over chunks.

Only one chunk's activations are alive at a time, so memory is set by the chunk size, while the
loss still sees the whole batch. Chunks are (n_chunks, rows/n_chunks, ...) with the row axis
sharded over the data axes, so every chunk runs on all devices. Each chunk's dropout key is
derived from (step key, group, chunk), so both passes draw identical dropout masks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from unime_jax.sharding import constrain

Inputs = Mapping[str, jax.Array]
# (trainable params, model inputs of n rows, dropout key) -> (n, dim) embeddings
EmbedFn = Callable[[Any, Inputs, jax.Array], jax.Array]
# embeddings by group -> (loss, metrics)
LossFn = Callable[[dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


def _chunked(x: jax.Array, n_chunks: int) -> jax.Array:
    if x.shape[0] % n_chunks:
        raise ValueError(f"{x.shape[0]} rows do not split into {n_chunks} GradCache chunks")
    y = x.reshape(n_chunks, x.shape[0] // n_chunks, *x.shape[1:])
    return constrain(y, (None, "batch") + (None,) * (x.ndim - 1))


def split_chunks(tree: Any, n_chunks: int) -> Any:
    """Every leaf (rows, ...) -> (n_chunks, rows / n_chunks, ...), rows sharded over the data axes."""
    return jax.tree.map(lambda x: _chunked(x, n_chunks), tree)


def chunk_keys(key: jax.Array, n_chunks: int) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n_chunks))


def group_keys(key: jax.Array, names: list[str]) -> dict[str, jax.Array]:
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(names)}


def embed_chunks(embed: EmbedFn, params: Any, inputs: Inputs, key: jax.Array, n_chunks: int) -> jax.Array:
    """Embeddings of all rows, computed chunk by chunk (differentiable: XLA keeps every chunk's activations)."""
    out = jax.lax.map(
        lambda xs: embed(params, xs[0], xs[1]), (split_chunks(inputs, n_chunks), chunk_keys(key, n_chunks))
    )
    return out.reshape(-1, out.shape[-1])


def _pull_back(
    embed: EmbedFn, params: Any, inputs: Inputs, key: jax.Array, grads: jax.Array, n_chunks: int
) -> Any:
    """Sum over chunks of d(embeddings . cached grads)/d(params), one chunk's activations at a time."""

    def body(acc: Any, xs: tuple) -> tuple[Any, None]:
        chunk, chunk_key, chunk_grads = xs
        _, vjp = jax.vjp(lambda p: embed(p, chunk, chunk_key), params)
        (param_grads,) = vjp(chunk_grads)
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, param_grads), None

    # Accumulate in float32 even when parameters are bf16 (full fine-tuning).
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    xs = (split_chunks(inputs, n_chunks), chunk_keys(key, n_chunks), split_chunks(grads, n_chunks))
    total, _ = jax.lax.scan(body, zeros, xs)
    return total


def gradcache_value_and_grad(
    embed: EmbedFn, loss_fn: LossFn, params: Any, groups: dict[str, Inputs], key: jax.Array, n_chunks: int
) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Any]:
    """((loss, metrics), grads) with GradCache's memory profile."""
    keys = group_keys(key, list(groups))
    embeddings = {
        name: jax.lax.stop_gradient(embed_chunks(embed, params, inputs, keys[name], n_chunks))
        for name, inputs in groups.items()
    }
    (loss, metrics), embedding_grads = jax.value_and_grad(loss_fn, has_aux=True)(embeddings)
    grads = None
    for name, inputs in groups.items():
        part = _pull_back(embed, params, inputs, keys[name], embedding_grads[name], n_chunks)
        grads = part if grads is None else jax.tree.map(jnp.add, grads, part)
    return (loss, metrics), grads


def direct_value_and_grad(
    embed: EmbedFn, loss_fn: LossFn, params: Any, groups: dict[str, Inputs], key: jax.Array, n_chunks: int = 1
) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Any]:
    """The plain computation (same chunking and dropout keys): the reference GradCache must equal."""
    keys = group_keys(key, list(groups))

    def total(p: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        embeddings = {
            name: embed_chunks(embed, p, inputs, keys[name], n_chunks) for name, inputs in groups.items()
        }
        return loss_fn(embeddings)

    return jax.value_and_grad(total, has_aux=True)(params)
