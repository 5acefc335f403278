"""Shared image-processing pieces for the Phi-3.5-V and LLaVA-NeXT processors (numpy/PIL only).

Both backbones feed CLIP ViT-L/14-336 with a stack of square crops normalised by the OpenAI CLIP
statistics; they differ in how the crops are cut (each backbone's ``images`` module:
``unime_jax.backbones.llava_next.images``, ``unime_jax.backbones.phi3_v.images``) and in where
the crops are normalised: on the device for LLaVA-NeXT, whose crops are uint8 until then, on the
host for Phi-3.5-V, whose global view is resized after normalisation (the CLIP tower,
``unime_jax.models.clip``, takes both). :func:`resize_square` is VLM2Vec's optional resize of every
image before any processor, which the embedder and the stage-2 data share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "DECODE_ERRORS",
    "ImageInput",
    "ProcessedImage",
    "channels_first",
    "resize_square",
    "split_into_crops",
    "to_rgb",
]

# What PIL raises on missing, truncated, corrupt or unsupported files: OSError covers
# UnidentifiedImageError and truncated files; ValueError/DecompressionBombError come from malformed
# headers and huge sizes.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

ImageInput = Image.Image | np.ndarray


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the vision tower.

    ``pixel_values`` is (num_crops, 3, crop, crop): uint8 before normalisation where every crop is
    exactly representable so (LLaVA-NeXT), float32 in CLIP space otherwise (Phi-3.5-V);
    ``image_size`` is what the model glue needs to undo the crop layout (its meaning is
    processor-specific: the padded HD size for Phi-3.5-V, the original size for LLaVA-NeXT);
    ``num_tokens`` is the number of image placeholder tokens the text must reserve.
    """

    pixel_values: np.ndarray
    image_size: tuple[int, int]
    num_tokens: int


def to_rgb(image: ImageInput) -> Image.Image:
    """A PIL RGB image from a PIL image of any mode or an (H, W, 3) uint8 array."""
    if isinstance(image, Image.Image):
        # Like the references: a plain convert, so alpha is dropped rather than composited.
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
        return Image.fromarray(image)
    raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


def resize_square(image: ImageInput, size: int) -> Image.Image:
    """VLM2Vec's ``process_image``: the image as opened resized to size x size (PIL's default filter
    for its mode, aspect ratio ignored), then converted to RGB.

    Resizing before the conversion matters: PIL resamples palette and 1-bit images with NEAREST,
    other modes with BICUBIC, as VLM2Vec's ``Image.open(...).resize(...)`` does.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image.resize((size, size)).convert("RGB")


def channels_first(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C) → contiguous (C, H, W), the layout the vision tower takes."""
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def split_into_crops(image: np.ndarray, crop_size: int) -> np.ndarray:
    """(C, H, W) with H, W multiples of ``crop_size`` → (H/crop · W/crop, C, crop, crop), row-major."""
    channels, height, width = image.shape
    if height % crop_size or width % crop_size:
        raise ValueError(f"image {height}x{width} is not a multiple of the crop size {crop_size}")
    rows, cols = height // crop_size, width // crop_size
    grid = image.reshape(channels, rows, crop_size, cols, crop_size).transpose(1, 3, 0, 2, 4)
    return grid.reshape(rows * cols, channels, crop_size, crop_size)
