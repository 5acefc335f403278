"""Rotary position embeddings in HF's rotate-half layout (no q/k permutation needed on conversion).

Supports the default RoPE and Phi-3 `longrope` (legacy name `su`): per-frequency short/long rescale
factors and a cos/sin attention factor. HF picks the long factors when max(position_ids)+1 exceeds
`original_max_position_embeddings`; positions are always arange(seq_len) with right padding, so the
choice depends only on the static sequence length and is made in Python, keeping jit shapes static.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class RopeScaling:
    """Phi-3 longrope parameters (HF `rope_scaling` / `rope_parameters`)."""

    short_factor: tuple[float, ...]  # per-frequency divisors for sequences up to the original length
    long_factor: tuple[float, ...]  # per-frequency divisors beyond it
    original_max_position_embeddings: int  # pre-training context; the short/long switch point
    attention_factor: float | None = None  # cos/sin multiplier; None = HF's default formula


def attention_factor(scaling: RopeScaling, max_position_embeddings: int) -> float:
    """HF's default: sqrt(1 + ln(max/original) / ln(original)), 1 when not extended."""
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    factor = max_position_embeddings / scaling.original_max_position_embeddings
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(scaling.original_max_position_embeddings))


def inverse_frequencies(rotary_dim: int, theta: float, ext_factors: tuple[float, ...] | None) -> np.ndarray:
    """1 / (factor_i * theta^(2i/d)), in float32 as HF computes it."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim
    base = np.float32(theta) ** exponents
    if ext_factors is not None:
        if len(ext_factors) != rotary_dim // 2:
            raise ValueError(f"longrope needs {rotary_dim // 2} factors, got {len(ext_factors)}")
        base = np.asarray(ext_factors, dtype=np.float32) * base
    return (1.0 / base).astype(np.float32)


def cos_sin(
    seq_len: int,
    *,
    rotary_dim: int,
    theta: float,
    scaling: RopeScaling | None,
    max_position_embeddings: int,
    dtype: jnp.dtype,
) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables of shape (seq_len, rotary_dim) for positions 0..seq_len-1."""
    factors, mult = None, 1.0
    if scaling is not None:
        long = seq_len > scaling.original_max_position_embeddings
        factors = scaling.long_factor if long else scaling.short_factor
        mult = attention_factor(scaling, max_position_embeddings)
    inv_freq = jnp.asarray(inverse_frequencies(rotary_dim, theta, factors))
    freqs = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * mult).astype(dtype), (jnp.sin(emb) * mult).astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first rotary_dim channels of x (batch, seq, heads, head_dim); pass the rest through."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = rot * cos + _rotate_half(rot) * sin
    return jnp.concatenate([rotated, rest], axis=-1) if rest.shape[-1] else rotated
