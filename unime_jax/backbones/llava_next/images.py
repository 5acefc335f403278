"""LLaVA-NeXT ("anyres") image processor, matching transformers' slow numpy/PIL ``LlavaNextImageProcessor``.

Steps (transformers' ``LlavaNextImageProcessor.preprocess``): pick the grid pinpoint that keeps the most of the image; resize
to fit it keeping the aspect ratio (PIL bicubic); centre-pad with black to the pinpoint; cut
into crops row-major; prepend the whole image squashed to one crop (aspect ratio ignored);
rescale and normalise. With ``shortest_edge == crop_size`` the per-crop resize and centre crop
of the reference are identities, so they are not repeated here.

Every step before the rescale works on uint8 (PIL resizes uint8 images to uint8, the letterbox is
pixel value 0), so the crops leave as uint8 and the CLIP tower rescales and normalises them on the
device (``unime_jax.models.clip.normalize_pixels``, the same float32 values as on the host).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from unime_jax.processing.images import ImageInput, ProcessedImage, channels_first, split_into_crops, to_rgb

__all__ = [
    "LLAVA_V16_PINPOINTS",
    "LlavaNextImageProcessor",
    "LlavaProcessedImage",
    "fit_size",
    "llava_next_num_tokens",
    "select_best_resolution",
    "unpad_shape",
]

# (height, width) pinpoints of llava-hf/llava-v1.6-{mistral,vicuna}-7b-hf.
LLAVA_V16_PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 672),
    (672, 336),
    (672, 672),
    (1008, 336),
    (336, 1008),
)


def select_best_resolution(
    image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps the most original pixels, then wastes the fewest.

    Strict comparisons: on an exact tie the earlier pinpoint wins, so a small square image
    gets (336, 672), not (672, 336).
    """
    height, width = image_size
    best, best_effective, best_wasted = pinpoints[0], 0, math.inf
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pin_h, pin_w), effective, wasted
    return best[0], best[1]


def fit_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized to fit ``target`` keeping its aspect ratio (ceil-rounded)."""
    height, width = image_size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpad_shape(
    orig_size: tuple[int, int], grid_pinpoint: tuple[int, int], patch_grid: int = 24, crop_size: int = 336
) -> tuple[int, int]:
    """(rows, cols) of the crop feature map after LLaVA-NeXT removes the letterbox padding.

    ``grid_pinpoint`` is the chosen (height, width) resolution in pixels; each ``crop_size``
    crop gives a ``patch_grid``² feature map. The padding is removed symmetrically as
    ``(current − new) // 2`` on both sides, with ``new`` rounded by ``int(round(x, 7))``, so
    an odd leftover keeps one extra padded row or column, exactly as ``unpad_image`` does.
    """
    height, width = orig_size
    rows = grid_pinpoint[0] // crop_size * patch_grid
    cols = grid_pinpoint[1] // crop_size * patch_grid
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        rows -= (rows - new_rows) // 2 * 2
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= (cols - new_cols) // 2 * 2
    return rows, cols


def llava_next_num_tokens(
    orig_size: tuple[int, int],
    pinpoints: Sequence[tuple[int, int]] = LLAVA_V16_PINPOINTS,
    crop_size: int = 336,
    patch_size: int = 14,
) -> int:
    """Image tokens: the base crop's grid (CLS dropped), then each unpadded row plus one ``image_newline``."""
    patch_grid = crop_size // patch_size
    rows, cols = unpad_shape(orig_size, select_best_resolution(orig_size, pinpoints), patch_grid, crop_size)
    return patch_grid * patch_grid + rows * (cols + 1)


@dataclass(frozen=True)
class LlavaProcessedImage(ProcessedImage):
    """A processed LLaVA-NeXT image plus the crop grid of its pinpoint.

    ``image_grid`` is (rows, cols) = ``select_best_resolution(image_size, pinpoints) // crop_size``,
    the model's ``image_grids`` input. The choice is made here, in float64 exactly as HF makes it,
    because near-ties can flip under the float32 or integer arithmetic a device would use.
    """

    image_grid: tuple[int, int]


@dataclass(frozen=True)
class LlavaNextImageProcessor:
    """LLaVA-v1.6 preprocessing up to the rescale; defaults are llava-hf/llava-v1.6-mistral-7b-hf's.

    The normalisation statistics are the vision tower's (``CLIPVisionConfig.image_mean`` and
    ``image_std``, the checkpoint's OpenAI CLIP ones), which applies them on the device.
    """

    image_grid_pinpoints: tuple[tuple[int, int], ...] = LLAVA_V16_PINPOINTS
    crop_size: int = 336
    patch_size: int = 14

    def __post_init__(self) -> None:
        bad = [pin for pin in self.image_grid_pinpoints if pin[0] % self.crop_size or pin[1] % self.crop_size]
        if bad:
            raise ValueError(f"grid pinpoints must be multiples of crop_size={self.crop_size}, got {bad}")

    @property
    def max_crops(self) -> int:
        """Base crop plus the most crops any pinpoint is cut into."""
        return 1 + max(h * w for h, w in self.image_grid_pinpoints) // self.crop_size**2

    @property
    def max_num_tokens(self) -> int:
        """An upper bound on ``num_tokens``: a pinpoint filled exactly, so nothing is unpadded."""
        patch_grid = self.crop_size // self.patch_size
        return patch_grid * patch_grid + max(
            (h // self.crop_size * patch_grid) * (w // self.crop_size * patch_grid + 1)
            for h, w in self.image_grid_pinpoints
        )

    def best_resolution(self, height: int, width: int) -> tuple[int, int]:
        return select_best_resolution((height, width), self.image_grid_pinpoints)

    def image_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of crops the best pinpoint for an image of this size is cut into."""
        target_h, target_w = self.best_resolution(height, width)
        return target_h // self.crop_size, target_w // self.crop_size

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens for an original image of this size."""
        return llava_next_num_tokens(
            (height, width), self.image_grid_pinpoints, self.crop_size, self.patch_size
        )

    def __call__(self, image: ImageInput) -> LlavaProcessedImage:
        image = to_rgb(image)
        height, width = image.height, image.width
        target_h, target_w = self.best_resolution(height, width)
        fit_h, fit_w = fit_size((height, width), (target_h, target_w))
        fitted = np.asarray(image.resize((fit_w, fit_h), Image.Resampling.BICUBIC))
        top, left = (target_h - fit_h) // 2, (target_w - fit_w) // 2
        # Padding is black in pixel space (0 before normalisation), unlike Phi-3.5-V's white.
        letterboxed = np.pad(
            fitted,
            ((top, target_h - fit_h - top), (left, target_w - fit_w - left), (0, 0)),
            constant_values=0,
        )
        base = np.asarray(image.resize((self.crop_size, self.crop_size), Image.Resampling.BICUBIC))
        crops = split_into_crops(channels_first(letterboxed), self.crop_size)
        return LlavaProcessedImage(
            pixel_values=np.concatenate([channels_first(base)[None], crops]),  # uint8
            image_size=(height, width),
            num_tokens=self.num_tokens(height, width),
            image_grid=(target_h // self.crop_size, target_w // self.crop_size),
        )
