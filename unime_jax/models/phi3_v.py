"""Phi-3.5-vision (HF remote code `Phi3VForCausalLM`) in Flax NNX: CLIP crops, HD merge, Phi-3 decoder.

One image with an h×w crop grid (h·w <= num_crops) becomes, with m = (image_size / patch_size) / 2
(12 for CLIP-L/14-336):
  1. CLIP hidden_states[feature_layer] without CLS for the global view and the h·w sub-crops;
  2. a 2×2 merge of each crop's (2m)×(2m) patch grid into m×m tokens of 4·D_clip channels;
  3. the sub-crops tiled row-major into an (m·h)×(m·w) grid, `sub_GN` after each grid row; then
     `glb_GN`; then the global m×m grid, again with `sub_GN` after each row;
  4. the 2-layer MLP projector; the result is written, in order, over the row's negative-id
     placeholders of input_ids (the processor emits -1 for image 1, with attention mask 1).

Everything is static under jit although h and w are data (image_sizes): each row builds a padded
worst-case layout (`Phi3VConfig.max_image_tokens` slots) by gathering from a table of merged crop
tokens, writes the two separators in and projects, and a cumulative count over the placeholder
positions picks the slot for each of them (MaxText's `merge_mm_embeddings` pattern). Padded crops
and the crops of text-only rows go through CLIP like real ones and are then never read, as in the
reference; the packed training layout instead runs `tile_features` on real crops only and passes
each row's gathered tokens (`gathered_features`).
One image per row; text-only rows carry image_sizes (0, 0) and no placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models.attention import Implementation
from unime_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
from unime_jax.models.decoder import DecoderConfig, DecoderModel, Remat, build_lm_head
from unime_jax.models.layers import Linear, activation, param
from unime_jax.models.multimodal import gather_rows, merge_image_features, push_runtime


def image_token_count(h_crops: int, w_crops: int, merged_side: int) -> int:
    """Placeholders for an h×w crop grid: the sub grid with a separator per row, glb_GN, the global
    grid with a separator per row; m = merged_side tokens per crop side.

    144·(h·w + 1) + 12·(h + 1) + 1 for CLIP-L/14-336, as the Phi-3-V processor counts them.
    """
    m = merged_side
    return m * h_crops * (m * w_crops + 1) + 1 + m * (m + 1)


@dataclass(frozen=True)
class Phi3VConfig:
    """Phi-3-V architecture (a Phi-3 decoder and a CLIP tower) plus static-shape limits and run-time choices.

    The run-time fields here are the source of truth: they are pushed into both sub-configs, so
    `dataclasses.replace(cfg, dtype=...)` (`backbones.with_runtime`) updates the whole model.
    """

    text: DecoderConfig  # the Phi-3 language model
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)  # CLIP-L/14-336 in the checkpoints
    num_crops: int = 4  # most sub-crops per image (the processor's HD budget); fixes the padded shapes
    feature_layer: int = -2  # CLIP hidden_states index the image features are read from
    dtype: str = "float32"  # compute dtype of both towers
    param_dtype: str = "float32"  # parameter storage dtype of both towers
    attention: Implementation = "auto"  # attention kernel of both towers
    remat: Remat = "none"  # decoder-layer rematerialisation policy

    def __post_init__(self) -> None:
        if self.text.family != "phi3":
            raise ValueError(f"Phi-3-V needs a phi3 decoder, got family {self.text.family!r}")
        grid, rest = divmod(self.vision.image_size, self.vision.patch_size)
        if rest or grid % 2:
            raise ValueError(
                f"the 2×2 merge needs an even patch grid, got {self.vision.image_size}/{self.vision.patch_size}"
            )
        push_runtime(self)

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @property
    def crop_size(self) -> int:
        """Side in pixels of every crop; image_sizes are multiples of it."""
        return self.vision.image_size

    @property
    def merged_side(self) -> int:
        """m: each crop becomes m×m tokens after the 2×2 merge (12 for CLIP-L/14-336)."""
        return self.vision.image_size // self.vision.patch_size // 2

    @property
    def max_crops(self) -> int:
        """Crops per image in pixel_values: the global view plus num_crops sub-crop slots."""
        return self.num_crops + 1

    def num_image_tokens(self, h_crops: int, w_crops: int) -> int:
        """Placeholders for an h×w crop grid (:func:`image_token_count`)."""
        return image_token_count(h_crops, w_crops, self.merged_side)

    @property
    def max_image_tokens(self) -> int:
        """Padded feature length per image: the worst grid with h·w <= num_crops (a single column)."""
        n = self.num_crops
        return max(self.num_image_tokens(h, w) for h in range(1, n + 1) for w in range(1, n // h + 1))


class Activation(nnx.Module):
    """A parameter-free layer, so the projector's Linears keep HF's `nn.Sequential` indices 0 and 2."""

    def __init__(self, name: str):
        self.fn = activation(name)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(x)


def merge_2x2(features: jax.Array, grid: int) -> jax.Array:
    """(N, grid², C) -> (N, (grid/2)², 4C); channels ordered by (dy, dx) = (0,0), (0,1), (1,0), (1,1)."""
    n, _, c = features.shape
    m = grid // 2
    x = features.reshape(n, m, 2, m, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, m * m, 4 * c)


def hd_layout(
    image_sizes: jax.Array, cfg: Phi3VConfig, length: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, 2) padded HD sizes -> where each of `length` image-token slots per row comes from.

    Returns (index, sub, glb), each (B, length): index into the image's table of merged crop tokens
    (crop k at rows k·m² .. (k+1)·m² - 1, crop 0 = the global view), and the slots that hold the
    `sub_GN` and `glb_GN` separators. Separator slots and slots past the image's token count read
    row 0; the latter are never used.
    """
    m = cfg.merged_side
    h = image_sizes[:, :1].astype(jnp.int32) // cfg.crop_size
    w = image_sizes[:, 1:].astype(jnp.int32) // cfg.crop_size
    slot = jnp.arange(length, dtype=jnp.int32)[None]

    # Sub-crop grid: m·h rows of m·w tokens plus a separator.
    row_len = m * w + 1
    sub_len = m * h * row_len
    r, c = slot // row_len, slot % row_len
    crop = 1 + (r // m) * w + c // m
    in_sub = slot < sub_len
    sub_sep = in_sub & (c == m * w)

    # Global view after glb_GN: m rows of m tokens plus a separator.
    g = slot - sub_len - 1
    gr, gc = g // (m + 1), g % (m + 1)
    valid = slot < sub_len + 1 + m * (m + 1)
    glb = slot == sub_len
    glob_sep = valid & (g >= 0) & (gc == m)

    index = jnp.where(in_sub, crop * m * m + (r % m) * m + c % m, gr * m + gc)
    separator = sub_sep | glob_sep | glb
    return jnp.where(valid & ~separator, index, 0), sub_sep | glob_sep, glb


class Phi3ImageEmbedding(nnx.Module):
    """HF `vision_embed_tokens`: CLIP tower, HD separators and projector (its `wte` is embed_tokens)."""

    def __init__(self, cfg: Phi3VConfig, rngs: nnx.Rngs):
        dtypes = {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}
        merged, hidden = 4 * cfg.vision.hidden_size, cfg.text.hidden_size
        zeros = nnx.initializers.zeros  # HF initialises both separators to zero
        self.glb_GN = param(rngs, zeros, (1, 1, merged), dtypes["param_dtype"], (None, None, None))
        self.sub_GN = param(rngs, zeros, (1, 1, 1, merged), dtypes["param_dtype"], (None, None, None, None))
        self.img_processor = CLIPVisionModel(cfg.vision, rngs)
        self.img_projection = nnx.List(
            [
                Linear(merged, hidden, use_bias=True, axes=("embed", "mlp"), rngs=rngs, **dtypes),
                Activation("gelu"),  # torch nn.GELU(): exact erf
                Linear(hidden, hidden, use_bias=True, axes=("mlp", "embed"), rngs=rngs, **dtypes),
            ]
        )
        self.cfg = cfg

    def _project(self, x: jax.Array) -> jax.Array:
        for layer in self.img_projection:
            x = layer(x)
        return x

    def tile_features(self, crops: jax.Array) -> jax.Array:
        """Crops (N, C, S, S) -> merged CLIP tokens (N, m², 4·D_clip): the selected layer, CLS dropped, 2×2 merge."""
        patches = self.img_processor.hidden_state(crops, self.cfg.feature_layer)[:, 1:]
        return merge_2x2(patches, 2 * self.cfg.merged_side)

    def gather_features(self, pixel_values: jax.Array, image_sizes: jax.Array) -> jax.Array:
        """pixel_values (B, P, C, S, S), global view first, P <= max_crops -> merged tokens
        (B, max_image_tokens, 4·D_clip) in :func:`hd_layout` order. Crop slots past an image's own
        crops are run but never read."""
        b, n = pixel_values.shape[:2]
        if n > self.cfg.max_crops:
            raise ValueError(
                f"pixel_values has {n} crops per image; this config has at most {self.cfg.max_crops}"
            )
        tokens = self.tile_features(pixel_values.reshape(b * n, *pixel_values.shape[2:]))
        table = tokens.reshape(b, n * tokens.shape[1], -1)
        index, _, _ = hd_layout(image_sizes, self.cfg, self.cfg.max_image_tokens)
        return gather_rows(table, index)

    def pack_features(self, gathered: jax.Array, image_sizes: jax.Array) -> jax.Array:
        """Gathered merged tokens (B, L, 4·D_clip) -> the separators written in and projected: (B, L, D)."""
        _, sub, glb = hd_layout(image_sizes, self.cfg, gathered.shape[1])
        sub_gn = self.sub_GN[...].reshape(-1).astype(gathered.dtype)
        glb_gn = self.glb_GN[...].reshape(-1).astype(gathered.dtype)
        x = jnp.where(sub[..., None], sub_gn, jnp.where(glb[..., None], glb_gn, gathered))
        # The projector acts per token, so projecting the laid-out sequence equals HF's project-after-concatenate.
        return self._project(x)

    def __call__(self, pixel_values: jax.Array, image_sizes: jax.Array) -> jax.Array:
        """pixel_values (B, P, C, S, S), global view first -> (B, max_image_tokens, D)."""
        return self.pack_features(self.gather_features(pixel_values, image_sizes), image_sizes)


class Phi3VModel(DecoderModel):
    """HF `Phi3VModel`: the Phi-3 decoder (embed_tokens, layers, norm) plus `vision_embed_tokens`."""

    def __init__(self, cfg: Phi3VConfig, rngs: nnx.Rngs):
        super().__init__(cfg.text, rngs)
        self.vision_embed_tokens = Phi3ImageEmbedding(cfg, rngs)

    def embed(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        image_sizes: jax.Array | None,
        gathered_features: jax.Array | None = None,
    ) -> jax.Array:
        """Token embeddings with image features over the negative-id placeholders (B, T, D)."""
        embeds = self.embed_tokens(jnp.maximum(input_ids, 0))
        if pixel_values is None and gathered_features is None:
            return embeds
        if image_sizes is None:
            raise ValueError("pixel_values needs image_sizes (B, 2): the padded HD size of each image")
        vision = self.vision_embed_tokens
        if gathered_features is None:
            gathered_features = vision.gather_features(pixel_values, image_sizes)
        return merge_image_features(
            embeds, vision.pack_features(gathered_features, image_sizes), input_ids < 0
        )


class Phi3VForCausalLM(nnx.Module):
    """HF `Phi3VForCausalLM`: `model` plus `lm_head` (kept so checkpoints round-trip; embeddings never use it)."""

    def __init__(self, cfg: Phi3VConfig, rngs: nnx.Rngs):
        self.model = Phi3VModel(cfg, rngs)
        build_lm_head(self, cfg.text, rngs)
        self.cfg = cfg

    def tile_features(self, crops: jax.Array) -> jax.Array:
        """Crops (N, C, S, S) -> merged CLIP tokens (N, m², 4·D_clip) (:meth:`Phi3ImageEmbedding.tile_features`)."""
        return self.model.vision_embed_tokens.tile_features(crops)

    def feature_index(self, length: int, image_sizes: jax.Array) -> jax.Array:
        """(B, length): for each image-token slot, the row of the image's own merged-token table it reads."""
        return hd_layout(image_sizes, self.cfg, length)[0]

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array,
        pixel_values: jax.Array | None = None,
        image_sizes: jax.Array | None = None,
        gathered_features: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states (B, T, D) of right-padded rows.

        input_ids (B, T): token ids, image placeholders negative; attention_mask (B, T): 1 on real
        tokens, placeholders included; pixel_values (B, P, 3, S, S), P <= num_crops+1: global view
        first, unused crop slots zero; image_sizes (B, 2): padded HD (height, width), multiples of S,
        (0, 0) for text-only rows. pixel_values None = a text-only batch. ``gathered_features``
        (B, L, 4·D_clip) replaces pixel_values: each row's merged crop tokens already gathered in
        :meth:`feature_index` order (the packed training layout runs :meth:`tile_features` once per
        real crop and gathers).
        """
        embeds = self.model.embed(input_ids, pixel_values, image_sizes, gathered_features)
        return self.model(attention_mask=attention_mask, inputs_embeds=embeds)
