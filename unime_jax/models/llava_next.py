"""LLaVA-NeXT (LLaVA-1.6, HF `LlavaNextForConditionalGeneration`) in Flax NNX: anyres CLIP tiles, unpad, merge.

One image whose best-fitting grid pinpoint is gh×gw tiles of S×S pixels (S = the CLIP image size,
n = S / patch_size features per tile side) becomes, as in HF's `pack_image_features`:
  1. CLIP hidden_states[vision_feature_layer] without CLS for the base tile (the whole image
     squashed to S×S) and the gh·gw grid tiles, each through the 2-layer projector;
  2. the base tile's n² features;
  3. the grid tiles' features laid out as one (gh·n)×(gw·n) map, with the letterbox padding of
     the original aspect ratio cut off symmetrically (HF `unpad_image`), and `image_newline` after
     each remaining row;
  4. the result written, in order, over the row's `image_token_index` placeholders of input_ids.

Everything is static under jit although the layout is data: each row gathers a padded worst-case
sequence (`LlavaNextConfig.max_image_tokens` slots) from its table of projected tile features, and
a cumulative count over the placeholder positions picks the slot for each of them (MaxText's
`merge_mm_embeddings` pattern). Padded tiles and the tiles of text-only rows go through CLIP like
real ones and are never read; the packed training layout instead runs `tile_features` on real
tiles only and passes each row's gathered features (`gathered_features`). One image per row;
text-only rows have no placeholders.

Model inputs (right-padded rows):
  input_ids       (B, T) int32   image placeholders = image_token_index, one per image token
  attention_mask  (B, T) int32   1 on real tokens, placeholders included
  pixel_values    (B, P, 3, S, S) float32   P <= max_image_patches: base tile, then the grid tiles
                                  row-major, unused slots zero (the HF processor's layout; a batch
                                  may stop at its largest real tile count)
  image_sizes     (B, 2) int32   original (height, width) of each image; (0, 0) for text-only rows
  image_grids     (B, G) int32   G = `LlavaNextConfig.image_grid_width`: here 2, the (rows, cols)
                                  of tiles of the chosen pinpoint, i.e.
                                  select_best_resolution(image_size, pinpoints) // S; zeros for
                                  text-only rows (LLaVA-OneVision appends its feature grid: G = 4)
`image_grids` is computed on the host (the processor chooses the pinpoint anyway) because HF's
choice uses float64 arithmetic (`int(W * (w / W))` can fall one pixel short) that decides near
ties, so an on-device float32 or integer version would disagree on a few sizes in a million.
The unpadding, by contrast, is exact in integer arithmetic and is computed here from both arrays.
Without pixel_values the model is the bare language model (text-only batches, UniME stage 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models.attention import Implementation
from unime_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
from unime_jax.models.decoder import DecoderConfig, DecoderLM, Remat
from unime_jax.models.layers import Linear, activation, param
from unime_jax.models.multimodal import gather_rows, merge_image_features, push_runtime
from unime_jax.sharding import constrain


@dataclass(frozen=True)
class LlavaNextConfig:
    """LLaVA-NeXT architecture (a Llama/Mistral decoder and a CLIP tower) plus run-time choices.

    The run-time fields here are the source of truth: they are pushed into both sub-configs, so
    `dataclasses.replace(cfg, dtype=...)` (`backbones.with_runtime`) updates the whole model.
    """

    text: DecoderConfig  # the language model
    image_grid_pinpoints: tuple[
        tuple[int, int], ...
    ]  # anyres (height, width) canvases (llava-hf's: backbones.llava_next)
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)  # CLIP-L/14-336 in llava-hf
    image_token_index: int = 32000  # placeholder id of one image token in input_ids
    vision_feature_layer: int = -2  # CLIP hidden_states index the image features are read from
    vision_feature_select_strategy: Literal["default"] = "default"  # drop CLS (anyres needs it)
    projector_hidden_act: str = "gelu"  # projector activation ("gelu" = exact erf)
    multimodal_projector_bias: bool = True  # biases on the projector's linear_1/linear_2
    dtype: str = "float32"  # compute dtype of both towers
    param_dtype: str = "float32"  # parameter storage dtype of both towers
    attention: Implementation = "auto"  # attention kernel of both towers
    remat: Remat = "none"  # decoder-layer rematerialisation policy
    # The columns of the model input `image_grids`, decided on the host (module docstring).
    image_grid_fields: ClassVar[tuple[str, ...]] = ("tile rows", "tile cols")

    def __post_init__(self) -> None:
        size = self.vision.image_size
        bad = [p for p in self.image_grid_pinpoints if p[0] % size or p[1] % size or min(p) <= 0]
        if bad:
            raise ValueError(
                f"image_grid_pinpoints must be positive multiples of the CLIP image size {size}, got {bad}"
            )
        push_runtime(self)

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @property
    def image_grid_width(self) -> int:
        """G: columns of `image_grids` per image."""
        return len(self.image_grid_fields)

    @property
    def tile_side(self) -> int:
        """n: features per tile side (24 for CLIP-L/14-336)."""
        return self.vision.image_size // self.vision.patch_size

    def _grids(self) -> list[tuple[int, int]]:
        s = self.vision.image_size
        return [(h // s, w // s) for h, w in self.image_grid_pinpoints]

    @property
    def max_image_patches(self) -> int:
        """P, tiles per image in pixel_values: the base tile plus the largest pinpoint's grid."""
        return 1 + max(rows * cols for rows, cols in self._grids())

    @property
    def max_image_tokens(self) -> int:
        """Padded feature length per image: base tile plus a pinpoint grid that needs no unpadding.

        2928 = 576 + 48·49 for the llava-hf pinpoints.
        """
        n = self.tile_side
        return n * n + max(rows * n * (cols * n + 1) for rows, cols in self._grids())


def unpadded_grid(
    image_sizes: jax.Array, image_grids: jax.Array, side: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(rows, cols, top, left) per image: the window of the (gh·side)×(gw·side) feature map HF keeps.

    HF's `unpad_image` compares aspect ratios in floats and rounds `int(round(x, 7))`; with integer
    sizes both are exact in integer arithmetic (k / W is never within 1e-7 of an integer for
    W < 1e7), so the cut is the same without float rounding.
    """
    height, width = image_sizes[:, 0].astype(jnp.int32), image_sizes[:, 1].astype(jnp.int32)
    cur_h, cur_w = image_grids[:, 0].astype(jnp.int32) * side, image_grids[:, 1].astype(jnp.int32) * side
    wider = width * cur_h > cur_w * height  # the image is wider than the canvas: bars top and bottom
    top = jnp.where(wider, (cur_h - height * cur_w // jnp.maximum(width, 1)) // 2, 0)
    left = jnp.where(wider, 0, (cur_w - width * cur_h // jnp.maximum(height, 1)) // 2)
    return cur_h - 2 * top, cur_w - 2 * left, top, left


def anyres_layout(
    image_sizes: jax.Array, image_grids: jax.Array, *, side: int, length: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where each of `length` feature slots per image comes from, in HF's packing order.

    Returns (index, newline, count): index (B, length) into the image's tile-feature table, whose
    tile k holds rows k·side² .. (k+1)·side² - 1 (tile 0 = base); newline (B, length) marks
    `image_newline` slots; count (B,) is the number of real slots (0 for rows without an image).
    Slots past the count point at row 0 and are never read.
    """
    per_tile = side * side
    rows, cols, top, left = unpadded_grid(image_sizes, image_grids, side)
    rows, cols, top, left = rows[:, None], cols[:, None], top[:, None], left[:, None]
    slot = jnp.arange(length, dtype=jnp.int32)[None]

    # After the base tile: `rows` feature rows of `cols` features, each ended by a newline.
    k = slot - per_tile
    r, c = k // (cols + 1), k % (cols + 1)
    y, x = top + r, left + c
    tile = 1 + (y // side) * image_grids[:, 1:].astype(jnp.int32) + x // side
    grid_index = tile * per_tile + (y % side) * side + x % side

    count = jnp.where(image_grids[:, 0] > 0, per_tile + rows[:, 0] * (cols[:, 0] + 1), 0)
    valid = slot < count[:, None]
    newline = valid & (k >= 0) & (c == cols)
    index = jnp.where(k < 0, slot, grid_index)
    return jnp.where(valid & ~newline, index, 0), newline, count


class LlavaNextMultiModalProjector(nnx.Module):
    """HF `multi_modal_projector`: linear_1 -> act -> linear_2, CLIP width to LM width."""

    def __init__(self, cfg: LlavaNextConfig, rngs: nnx.Rngs):
        dtypes = {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}
        d_in, d = cfg.vision.hidden_size, cfg.text.hidden_size
        bias = cfg.multimodal_projector_bias
        self.linear_1 = Linear(d_in, d, use_bias=bias, axes=("embed", "mlp"), rngs=rngs, **dtypes)
        self.linear_2 = Linear(d, d, use_bias=bias, axes=("mlp", "embed"), rngs=rngs, **dtypes)
        self.act = activation(cfg.projector_hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaNext(nnx.Module):
    """HF `LlavaNextForConditionalGeneration` in its saved (hub) layout: `vision_tower`,
    `multi_modal_projector`, `image_newline` and `language_model` (a `*ForCausalLM`, lm_head included
    so checkpoints round-trip; embeddings never use it)."""

    tower_cls: type[nnx.Module] = CLIPVisionModel  # LLaVA-OneVision's subclass puts SigLIP here

    def __init__(self, cfg: LlavaNextConfig, rngs: nnx.Rngs):
        d = cfg.text.hidden_size
        self.vision_tower = self.tower_cls(cfg.vision, rngs)
        self.multi_modal_projector = LlavaNextMultiModalProjector(cfg, rngs)
        # HF initialises it N(0, 1/d); checkpoints overwrite it.
        self.image_newline = param(
            rngs, nnx.initializers.normal(d**-0.5), (d,), jnp.dtype(cfg.param_dtype), ("norm",)
        )
        self.language_model = DecoderLM(cfg.text, rngs)
        self.cfg = cfg

    def tile_features(self, tiles: jax.Array) -> jax.Array:
        """CLIP features of tiles (N, C, S, S) -> (N, n², D_clip): the selected layer, CLS dropped ("default")."""
        return self.vision_tower.hidden_state(tiles, self.cfg.vision_feature_layer)[:, 1:]

    def feature_index(self, length: int, image_sizes: jax.Array, image_grids: jax.Array) -> jax.Array:
        """(B, length): for each image-token slot, the row of the image's own tile-feature table
        (tile k at rows k·n² .. (k+1)·n² - 1, tile 0 = base) it reads; newline and unused slots read row 0."""
        return anyres_layout(image_sizes, image_grids, side=self.cfg.tile_side, length=length)[0]

    def gather_features(
        self, pixel_values: jax.Array, image_sizes: jax.Array, image_grids: jax.Array
    ) -> jax.Array:
        """pixel_values (B, P, C, S, S), P <= max_image_patches -> tower features (B, max_image_tokens,
        D_vision), or (B, max_image_tokens, taps, D_vision) where slots blend (LLaVA-OneVision), in
        :meth:`feature_index` order; image_sizes (B, 2), image_grids (B, cfg.image_grid_width).
        Tile slots past an image's own tiles are run but never read."""
        b, p = pixel_values.shape[:2]
        if p > self.cfg.max_image_patches:
            raise ValueError(
                f"pixel_values has {p} tiles per image; this config has at most {self.cfg.max_image_patches}"
            )
        features = self.tile_features(pixel_values.reshape(b * p, *pixel_values.shape[2:]))
        table = features.reshape(b, p * features.shape[1], -1)
        # (B, L) rows, or (B, L, taps) where a slot blends several features (LLaVA-OneVision).
        return gather_rows(table, self.feature_index(self.cfg.max_image_tokens, image_sizes, image_grids))

    def pack_features(
        self, gathered: jax.Array, image_sizes: jax.Array, image_grids: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Gathered CLIP features (B, L, D_clip) -> the LM-width feature sequence (B, L, D) and its real
        length (B,); image_sizes (B, 2), image_grids (B, cfg.image_grid_width)."""
        _, newline, count = anyres_layout(
            image_sizes, image_grids, side=self.cfg.tile_side, length=gathered.shape[1]
        )
        # The projector acts per feature, so projecting after the layout gather equals HF's project-then-pack.
        packed = self.multi_modal_projector(gathered)
        packed = jnp.where(newline[..., None], self.image_newline[...].astype(packed.dtype), packed)
        return constrain(packed, ("batch", "seq", "act_embed")), count

    def image_features(
        self, pixel_values: jax.Array, image_sizes: jax.Array, image_grids: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """pixel_values (B, P, C, S, S) -> packed features (B, max_image_tokens, D) and their counts (B,)."""
        return self.pack_features(
            self.gather_features(pixel_values, image_sizes, image_grids), image_sizes, image_grids
        )

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array,
        pixel_values: jax.Array | None = None,
        image_sizes: jax.Array | None = None,
        image_grids: jax.Array | None = None,
        gathered_features: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states (B, T, D) of right-padded rows; inputs as in the module docstring.

        ``gathered_features`` (B, L, D_clip) replaces ``pixel_values``: each row's CLIP tile features
        already gathered in :meth:`feature_index` order for L slots (the packed training layout runs
        :meth:`tile_features` once per real tile and gathers). Each image row must carry exactly as
        many placeholders as its packed feature count, as HF's processor emits them; surplus
        placeholders keep the placeholder token's embedding.
        """
        if pixel_values is None and gathered_features is None:
            return self.language_model(input_ids, attention_mask=attention_mask)
        width = self.cfg.image_grid_width
        if image_sizes is None or image_grids is None:
            raise ValueError(
                f"pixel_values needs image_sizes (B, 2) and image_grids (B, {width}); see unime_jax.models.llava_next"
            )
        if image_grids.shape[-1] != width:
            raise ValueError(
                f"image_grids must be (B, {width}), ({', '.join(self.cfg.image_grid_fields)}) per image; "
                f"got shape {tuple(image_grids.shape)}"
            )
        if gathered_features is None:
            gathered_features = self.gather_features(pixel_values, image_sizes, image_grids)
        features, count = self.pack_features(gathered_features, image_sizes, image_grids)
        embeds = self.language_model.model.embed_tokens(input_ids)
        is_image = input_ids == self.cfg.image_token_index
        within = jnp.cumsum(is_image, axis=1, dtype=jnp.int32) <= count[:, None]
        embeds = merge_image_features(embeds, features, is_image & within)
        return self.language_model(attention_mask=attention_mask, inputs_embeds=embeds)
