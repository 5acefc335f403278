"""LLaVA-OneVision's input strategy: LLaVA-NeXT's (tiles, original size, ``<image>`` widened in the
ids, as ``LlavaOnevisionProcessor`` does) with OneVision's processor and a 4-wide ``image_grids``:
the tile grid and the packed feature grid the host decides (``unime_jax.models.llava_onevision``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unime_jax.backbones.llava_next.inputs import LlavaNextInputs
from unime_jax.backbones.llava_onevision.images import LlavaOnevisionImageProcessor
from unime_jax.models.llava_onevision import LlavaOnevisionConfig
from unime_jax.processing.featurizer import Arrays
from unime_jax.processing.images import ImageInput

__all__ = ["LlavaOnevisionInputs"]


@dataclass(frozen=True)
class LlavaOnevisionInputs(LlavaNextInputs):
    """One image per row: SigLIP tiles, the original size, and (tile rows, tile cols, feature rows, feature cols)."""

    cfg: LlavaOnevisionConfig

    def __post_init__(self) -> None:
        processor = LlavaOnevisionImageProcessor(
            image_grid_pinpoints=self.cfg.image_grid_pinpoints,
            crop_size=self.cfg.vision.image_size,
            patch_size=self.cfg.vision.patch_size,
            anyres_max=self.cfg.anyres_max,
        )
        object.__setattr__(self, "processor", processor)

    def process(self, image: ImageInput) -> tuple[Arrays, int]:
        arrays, num_tokens = super().process(image)
        height, width = (int(v) for v in arrays["image_sizes"])
        grids = (*arrays["image_grids"], *self.processor.feature_grid(height, width))
        return arrays | {"image_grids": np.asarray(grids, np.int32)}, num_tokens
