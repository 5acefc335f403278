"""UniME's embedding: the final-norm hidden state of the last real token, L2-normalised."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def last_token(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """hidden (batch, seq, dim) at index sum(mask)-1 of each right-padded row -> (batch, dim)."""
    last = jnp.maximum(jnp.sum(attention_mask, axis=-1, dtype=jnp.int32) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis, in float32 (torch.nn.functional.normalize's value).

    Written as ``x * rsqrt(max(||x||², eps²))``, whose gradient stays finite for an all-zero row
    (the norm's own gradient at 0 is NaN): embeddings and the losses use this one function.
    """
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def embed(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The UniME embedding of each row."""
    return l2_normalize(last_token(hidden, attention_mask))
