"""LLaVA-OneVision (HF `LlavaOnevisionForConditionalGeneration`) in Flax NNX: single images, anyres_max.

It is LLaVA-NeXT's glue (`unime_jax.models.llava_next`: the same module tree, tile layout, unpadding
and merge) with a SigLIP tower, a Qwen2 decoder and one more step. One image whose pinpoint is
gh×gw tiles (n = image_size / patch_size features per tile side) becomes, as in HF's
`pack_image_features`:
  1. SigLIP hidden_states[vision_feature_layer] of every token (no CLS to drop: the "full"
     strategy) for the base tile and the grid tiles, each through the 2-layer projector;
  2. the base tile's n² features;
  3. the grid tiles' features as one (gh·n)×(gw·n) map, its letterbox cut off (HF `unpad_image`)
     to rows×cols; when rows·cols > 1.21·N·n² (``anyres_max_N``: sqrt ratio above 1.1) the map is
     downscaled bilinearly (torch `interpolate`, align_corners=False) to oh×ow =
     (rows // ratio, cols // ratio); then `image_newline` after each row;
  4. the result written over the row's `image_token_index` placeholders.

Static shapes as in LLaVA-NeXT: every image-token slot reads a fixed number of taps from the image's
table of tile features, here 4 with bilinear weights (a slot that is not resampled reads one feature
with weight 1 and three with weight 0, exactly the feature). Projecting the taps before blending
equals HF's project-then-interpolate, because the blend is linear. The packed training layout
gathers the taps the same way (`feature_index` gives (B, L, 4) rows).

Model inputs are LLaVA-NeXT's except `image_grids`, which is (B, 4) int32 here: the tile grid
(rows, cols) of the chosen pinpoint and the packed feature map (oh, ow) after unpadding and the
anyres_max downscale. Both are computed on the host, where HF's float64 arithmetic decides them
(`int(rows // ratio)` sits on integer boundaries for many sizes); zeros for text-only rows.

Supported: one image per row (HF's single-image path, `batch_num_images` of 1). Not supported:
several images in one row (HF gives each image one 384² tile without anyres plus one newline) and
video (frames pooled 2×2 bilinearly); neither is used by UniME.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from unime_jax.models.llava_next import LlavaNext, LlavaNextConfig, unpadded_grid
from unime_jax.models.siglip import SiglipVisionConfig, SiglipVisionModel
from unime_jax.sharding import constrain

TAPS = 4  # bilinear: each packed feature blends (y0, x0), (y0, x1), (y1, x0), (y1, x1)
_ANYRES_MAX = re.compile(r"anyres_max_(\d+)")


def anyres_max_grid(rows: int, cols: int, side: int, max_patches: int) -> tuple[int, int]:
    """(oh, ow): the unpadded rows×cols feature map after HF's anyres_max downscale, in its float64
    arithmetic (a sqrt ratio above 1.1 shrinks both sides by it, flooring)."""
    ratio = math.sqrt(rows * cols / (max_patches * side**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


@dataclass(frozen=True)
class LlavaOnevisionConfig(LlavaNextConfig):
    """LLaVA-OneVision architecture (a Qwen2 decoder and a SigLIP tower) plus run-time choices."""

    vision: SiglipVisionConfig = field(default_factory=SiglipVisionConfig)  # SO400M/14-384 in llava-hf
    image_token_index: int = 151646  # placeholder id of one image token in input_ids (Qwen2's <image>)
    vision_feature_layer: int = -1  # SigLIP hidden_states index the image features are read from
    vision_feature_select_strategy: Literal["full"] = "full"  # every token (SigLIP has no CLS)
    vision_aspect_ratio: str = "anyres_max_9"  # feature maps above N·n² (×1.21) are downscaled
    image_grid_fields: ClassVar[tuple[str, ...]] = ("tile rows", "tile cols", "feature rows", "feature cols")

    def __post_init__(self) -> None:
        if not _ANYRES_MAX.fullmatch(self.vision_aspect_ratio):
            raise ValueError(
                f"vision_aspect_ratio must be 'anyres_max_N' (HF's only mode), got {self.vision_aspect_ratio!r}"
            )
        super().__post_init__()

    @property
    def anyres_max(self) -> int:
        """N of anyres_max_N: the feature budget of the grid, in base tiles."""
        return int(_ANYRES_MAX.fullmatch(self.vision_aspect_ratio).group(1))  # type: ignore[union-attr]

    @cached_property
    def max_image_tokens(self) -> int:
        """Padded feature length per image: the base tile plus the longest packed grid any unpadded
        map of any pinpoint gives (every cut of every grid is tried: one side full, the other 1..full)."""
        n, most = self.tile_side, 0
        for gh, gw in set(self._grids()):
            shapes = [(gh * n, c) for c in range(1, gw * n + 1)] + [(r, gw * n) for r in range(1, gh * n + 1)]
            for rows, cols in shapes:
                oh, ow = anyres_max_grid(rows, cols, n, self.anyres_max)
                most = max(most, oh * (ow + 1))
        return n * n + most


def _bilinear_taps(size: jax.Array, out: jax.Array, dst: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """torch's bilinear source indices (align_corners=False) along one axis of `size` -> `out` samples.

    Returns (i0, i1, lambda1): the two source indices and the weight of i1 (i0's is 1 - lambda1).
    When out == size the scale is 1, so lambda1 is 0 and i0 the destination itself.
    """
    scale = size.astype(jnp.float32) / jnp.maximum(out, 1).astype(jnp.float32)
    src = jnp.maximum(scale * (dst.astype(jnp.float32) + 0.5) - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), jnp.maximum(size - 1, 0))
    i1 = i0 + (i0 < size - 1).astype(jnp.int32)
    return i0, i1, jnp.clip(src - i0, 0.0, 1.0)


def onevision_layout(
    image_sizes: jax.Array, image_grids: jax.Array, *, side: int, length: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Where each of `length` feature slots per image comes from, in HF's packing order.

    Returns (index, weight, newline, count): index (B, length, 4) into the image's tile-feature table
    (tile k at rows k·side² .. (k+1)·side² - 1, tile 0 = base) and weight (B, length, 4) of each tap;
    newline (B, length) marks `image_newline` slots; count (B,) the real slots (0 without an image).
    Slots past the count, and newline slots, read row 0 with weights (1, 0, 0, 0) and are never used.
    """
    per_tile = side * side
    grids, out = image_grids[:, :2].astype(jnp.int32), image_grids[:, 2:].astype(jnp.int32)
    rows, cols, top, left = (v[:, None] for v in unpadded_grid(image_sizes, grids, side))
    oh, ow = out[:, :1], out[:, 1:]
    slot = jnp.arange(length, dtype=jnp.int32)[None]

    # After the base tile: oh packed rows of ow features, each ended by a newline.
    k = slot - per_tile
    r, c = k // (ow + 1), k % (ow + 1)
    y0, y1, wy = _bilinear_taps(rows, oh, r)
    x0, x1, wx = _bilinear_taps(cols, ow, c)

    def table_row(y: jax.Array, x: jax.Array) -> jax.Array:
        y, x = top + y, left + x
        return (1 + (y // side) * grids[:, 1:] + x // side) * per_tile + (y % side) * side + x % side

    index = jnp.stack([table_row(y0, x0), table_row(y0, x1), table_row(y1, x0), table_row(y1, x1)], -1)
    weight = jnp.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], -1)

    count = jnp.where(grids[:, 0] > 0, per_tile + oh[:, 0] * (ow[:, 0] + 1), 0)
    valid = slot < count[:, None]
    newline = valid & (k >= 0) & (c == ow)
    grid_slot = (valid & ~newline & (k >= 0))[..., None]
    single = jnp.asarray([1.0, 0.0, 0.0, 0.0], jnp.float32)
    base = jnp.where((k < 0) & valid, slot, 0)[..., None] * jnp.asarray([1, 0, 0, 0], jnp.int32)
    return jnp.where(grid_slot, index, base), jnp.where(grid_slot, weight, single), newline, count


class LlavaOnevision(LlavaNext):
    """HF `LlavaOnevisionForConditionalGeneration` in its saved (hub) layout: `vision_tower` (SigLIP),
    `multi_modal_projector`, `image_newline` and `language_model` (Qwen2 `*ForCausalLM`)."""

    tower_cls = SiglipVisionModel

    def tile_features(self, tiles: jax.Array) -> jax.Array:
        """SigLIP features of tiles (N, C, S, S) -> (N, n², D_vision): the selected layer, every token."""
        return self.vision_tower.hidden_state(tiles, self.cfg.vision_feature_layer)

    def _layout(self, length: int, image_sizes: jax.Array, image_grids: jax.Array):
        return onevision_layout(image_sizes, image_grids, side=self.cfg.tile_side, length=length)

    def feature_index(self, length: int, image_sizes: jax.Array, image_grids: jax.Array) -> jax.Array:
        """(B, length, 4): for each image-token slot, the rows of the image's own tile-feature table
        (tile k at rows k·n² .. (k+1)·n² - 1, tile 0 = base) its bilinear taps read."""
        return self._layout(length, image_sizes, image_grids)[0]

    def pack_features(
        self, gathered: jax.Array, image_sizes: jax.Array, image_grids: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Gathered taps (B, L, 4, D_vision) -> the LM-width feature sequence (B, L, D) and its real length (B,)."""
        _, weight, newline, count = self._layout(gathered.shape[1], image_sizes, image_grids)
        projected = self.multi_modal_projector(gathered)
        # In float32, rounded once to the compute dtype, as torch's interpolate does (float32 opmath
        # for bf16 inputs). Elementwise, not a matmul (whose float32 precision is the backend's
        # choice): a slot with weights (1, 0, 0, 0) is its feature bit for bit.
        blend = jnp.sum(projected.astype(jnp.float32) * weight[..., None], axis=2)  # weight: float32
        packed = blend.astype(projected.dtype)
        packed = jnp.where(newline[..., None], self.image_newline[...].astype(packed.dtype), packed)
        return constrain(packed, ("batch", "seq", "act_embed")), count
