"""LLaVA-OneVision's image processor, matching transformers' slow numpy/PIL ``LlavaOnevisionImageProcessor``
for single images.

Its pixels are LLaVA-NeXT's (``unime_jax.backbones.llava_next.images``): best pinpoint, aspect-kept
bicubic resize, black letterbox, row-major tiles after the whole image squashed to one tile, at
SigLIP's 384 pixels; crops leave as uint8 and the tower normalises them on the device. What differs
is the token count: ``LlavaOnevisionProcessor`` shrinks an unpadded feature map above the
anyres_max budget (``unime_jax.models.llava_onevision.anyres_max_grid``).
"""

from __future__ import annotations

from dataclasses import dataclass

from unime_jax.backbones.llava_next.images import LlavaNextImageProcessor, select_best_resolution, unpad_shape
from unime_jax.models.llava_onevision import anyres_max_grid

__all__ = ["LLAVA_OV_PINPOINTS", "LlavaOnevisionImageProcessor"]

# (height, width) pinpoints of llava-hf/llava-onevision-qwen2-*-ov-hf: every grid up to 6×6 tiles of 384.
LLAVA_OV_PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (384 * rows, 384 * cols) for rows in range(1, 7) for cols in range(1, 7)
)


@dataclass(frozen=True)
class LlavaOnevisionImageProcessor(LlavaNextImageProcessor):
    """OneVision preprocessing up to the rescale; defaults are llava-hf/llava-onevision-qwen2-7b-ov-hf's."""

    image_grid_pinpoints: tuple[tuple[int, int], ...] = LLAVA_OV_PINPOINTS
    crop_size: int = 384
    patch_size: int = 14
    anyres_max: int = 9  # the model's vision_aspect_ratio, anyres_max_9

    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the packed grid features: the unpadded map, downscaled above the budget."""
        side = self.crop_size // self.patch_size
        pinpoint = select_best_resolution((height, width), self.image_grid_pinpoints)
        rows, cols = unpad_shape((height, width), pinpoint, side, self.crop_size)
        return anyres_max_grid(rows, cols, side, self.anyres_max)

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens: the base tile's n² features, then each packed row plus one ``image_newline``."""
        rows, cols = self.feature_grid(height, width)
        return (self.crop_size // self.patch_size) ** 2 + rows * (cols + 1)
