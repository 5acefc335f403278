"""Phi-3.5-V image processor: the HD transform of the reference ``Phi3VImageProcessor``, in numpy/PIL.

Steps (the reference's ``HD_transform`` and ``preprocess``): convert to RGB; make the image landscape; pick the largest
``scale`` with ``scale · ceil(scale / ratio) ≤ num_crops``; PIL-bilinear resize to width
``scale · crop``; pad the height with white to a multiple of ``crop``, centred; transpose back;
normalise; prepend a global view (torch bicubic of the *normalised* padded image); zero-pad the
crop stack to ``num_crops + 1``.

Unlike LLaVA-NeXT's, these crops leave normalised, as float32: the global view is resized after
normalisation, so its values (bicubic overshoot included) are not uint8 levels, and the padding
crops are zero in CLIP space, which no uint8 level maps to. The HD crops alone would be exact in
uint8 (white padding is level 255, before normalisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from unime_jax.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize_pixels
from unime_jax.models.phi3_v import image_token_count
from unime_jax.processing.images import ImageInput, ProcessedImage, channels_first, split_into_crops, to_rgb

__all__ = [
    "Phi3VImageProcessor",
    "hd_padded_size",
    "hd_resized_size",
    "hd_transform",
    "phi3v_num_tokens",
    "resize_bicubic_like_torch",
]

# torch's bicubic (upsample_bicubic2d) uses Keys' kernel with A = -0.75, not the A = -0.5 of
# PIL and jax.image.resize.
_TORCH_CUBIC_A = -0.75


def hd_resized_size(height: int, width: int, num_crops: int, crop_size: int) -> tuple[int, int]:
    """(height, width) of the image after the HD resize, before padding."""
    long_side, short_side = max(width, height), min(width, height)
    ratio = long_side / short_side
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_long = scale * crop_size
    # Float division then truncation, exactly as the reference computes it.
    new_short = int(new_long / ratio)
    if new_short == 0:
        raise ValueError(f"aspect ratio of a {width}x{height} image is too extreme for the HD transform")
    return (new_long, new_short) if width < height else (new_short, new_long)


def hd_padded_size(height: int, width: int, num_crops: int, crop_size: int) -> tuple[int, int]:
    """(height, width) of the padded HD image: both multiples of ``crop_size``."""
    resized_h, resized_w = hd_resized_size(height, width, num_crops, crop_size)
    return -(-resized_h // crop_size) * crop_size, -(-resized_w // crop_size) * crop_size


def phi3v_num_tokens(
    padded_height: int, padded_width: int, crop_size: int = 336, patch_size: int = 14
) -> int:
    """Image tokens for a padded HD image of the given size: its crop grid's placeholder count
    (the model's :func:`~unime_jax.models.phi3_v.image_token_count`; each crop gives
    (crop/patch/2)² merged tokens)."""
    return image_token_count(
        padded_height // crop_size, padded_width // crop_size, crop_size // patch_size // 2
    )


def hd_transform(image: Image.Image, num_crops: int, crop_size: int) -> np.ndarray:
    """The padded HD image as (H, W, 3) uint8.

    Resizing happens on the transposed (landscape) image, as in the reference: PIL resizes
    horizontally then vertically with uint8 rounding in between, so resizing the portrait
    image directly would differ by a grey level here and there.
    """
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    resized_h, resized_w = hd_resized_size(image.height, image.width, num_crops, crop_size)
    pixels = np.asarray(image.resize((resized_w, resized_h), Image.Resampling.BILINEAR))
    target_h = -(-resized_h // crop_size) * crop_size
    top = (target_h - resized_h) // 2
    pixels = np.pad(pixels, ((top, target_h - resized_h - top), (0, 0), (0, 0)), constant_values=255)
    return pixels.transpose(1, 0, 2) if transposed else pixels


def _torch_cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (out, 4) and float32 weights (out, 4) of torch's bicubic, align_corners=False.

    torch works in float32 for float32 tensors, but its CPU build contracts ``scale · (i + ½) − ½``
    and the kernel polynomials into fused multiply-adds, which round once. Rounding to float32
    once, from float64, does the same; separate float32 steps put the source position an ulp
    off, which moves the weights by up to ~2e-5 once positions are in the hundreds.
    Out-of-range taps are clamped to the border pixel.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    source = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    first = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    t = np.clip(source - first.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float64)
    a = _TORCH_CUBIC_A

    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1).astype(np.float32)
    indices = np.clip(first[:, None] + np.arange(-1, 3), 0, in_size - 1)
    return indices, weights


def _cubic_along_last_axis(x: np.ndarray, out_size: int) -> np.ndarray:
    indices, weights = _torch_cubic_taps(x.shape[-1], out_size)
    taps = x[..., indices]  # (..., out, 4)
    # Summed tap by tap in order, as torch accumulates.
    return sum(taps[..., k] * weights[:, k] for k in range(4))


def resize_bicubic_like_torch(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """``torch.nn.functional.interpolate(x, (height, width), mode='bicubic', align_corners=False)``.

    Resizes the last two axes of a float32 array. torch interpolates along the width inside
    the height sum, so the width pass comes first.
    """
    x = np.asarray(x, np.float32)
    rows_resized = _cubic_along_last_axis(x, width)
    return np.swapaxes(_cubic_along_last_axis(np.swapaxes(rows_resized, -1, -2), height), -1, -2)


@dataclass(frozen=True)
class Phi3VImageProcessor:
    """Phi-3.5-vision-instruct preprocessing; defaults are the checkpoint's (num_crops 4, 336px crops)."""

    num_crops: int = 4
    crop_size: int = 336
    patch_size: int = 14
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        if self.num_crops < 1:
            raise ValueError(f"num_crops must be at least 1, got {self.num_crops}")

    @property
    def max_crops(self) -> int:
        """Crops per image, always: the global view plus ``num_crops`` (zero-padded)."""
        return self.num_crops + 1

    @property
    def max_num_tokens(self) -> int:
        """The largest token count over all reachable crop grids (a single column of num_crops)."""
        return phi3v_num_tokens(
            self.num_crops * self.crop_size, self.crop_size, self.crop_size, self.patch_size
        )

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens for an original image of this size, without touching pixels."""
        padded = hd_padded_size(height, width, self.num_crops, self.crop_size)
        return phi3v_num_tokens(*padded, self.crop_size, self.patch_size)

    def __call__(self, image: ImageInput) -> ProcessedImage:
        hd = normalize_pixels(
            channels_first(hd_transform(to_rgb(image), self.num_crops, self.crop_size)),
            self.image_mean,
            self.image_std,
        )
        padded_h, padded_w = hd.shape[1:]
        global_view = resize_bicubic_like_torch(hd, self.crop_size, self.crop_size)
        crops = split_into_crops(hd, self.crop_size)
        pixel_values = np.zeros((self.max_crops, 3, self.crop_size, self.crop_size), np.float32)
        pixel_values[0] = global_view
        pixel_values[1 : 1 + len(crops)] = crops
        return ProcessedImage(
            pixel_values=pixel_values,
            image_size=(padded_h, padded_w),
            num_tokens=phi3v_num_tokens(padded_h, padded_w, self.crop_size, self.patch_size),
        )
