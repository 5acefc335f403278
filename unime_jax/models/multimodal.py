"""Pieces the multimodal backbones (LLaVA-NeXT and OneVision, Phi-3.5-V) share."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp


def gather_rows(table: jax.Array, index: jax.Array) -> jax.Array:
    """Each row's own table entries: table (B, N, D) at index (B, ...) int -> (B, ..., D)."""
    gathered = jnp.take_along_axis(table, index.reshape(index.shape[0], -1, 1), axis=1)
    return gathered.reshape(*index.shape, table.shape[-1])


def merge_image_features(embeds: jax.Array, features: jax.Array, is_image: jax.Array) -> jax.Array:
    """Write features (B, L, D) over the placeholder positions of embeds (B, T, D), in order, per row.

    MaxText's `merge_mm_embeddings` pattern: a cumsum over the placeholder mask indexes the padded
    feature sequence, so shapes stay static whatever each row's image-token count.
    """
    slot = jnp.clip(jnp.cumsum(is_image, axis=1, dtype=jnp.int32) - 1, 0, features.shape[1] - 1)
    return jnp.where(is_image[..., None], gather_rows(features, slot).astype(embeds.dtype), embeds)


def push_runtime(cfg: Any) -> None:
    """Copy a frozen multimodal config's run-time fields into its text and vision sub-configs."""
    runtime = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "attention": cfg.attention}
    object.__setattr__(cfg, "text", replace(cfg.text, remat=cfg.remat, **runtime))
    object.__setattr__(cfg, "vision", replace(cfg.vision, **runtime))
