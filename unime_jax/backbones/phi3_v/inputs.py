"""Phi-3.5-V's input strategy: HD crops and the padded HD size; images as negative ids.

Token ids follow ``Phi3VProcessor._convert_images_texts_to_inputs``: each text chunk between image tags
is tokenised on its own, each with its own BOS, and image n is written as ``num_tokens`` copies
of ``-n``. Text-only rows are tokenised whole.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from unime_jax.backbones.phi3_v.images import Phi3VImageProcessor
from unime_jax.models.phi3_v import Phi3VConfig
from unime_jax.processing.featurizer import Arrays
from unime_jax.processing.images import ImageInput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Phi3VInputs", "phi3_v_ids"]

_IMAGE_TAGS = re.compile(r"<\|image_\d+\|>")  # Phi3VProcessor's split pattern


def phi3_v_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, num_image_tokens: Sequence[int] = ()
) -> list[int]:
    """Phi-3-V ids as ``Phi3VProcessor`` builds them.

    With images, the prompt is split on ``<|image_N|>``; every text chunk (even an empty one) is
    tokenised on its own, so each starts with BOS; tag N becomes ``num_image_tokens[N-1]`` copies of
    ``-N``. Tags must number the images 1..len(num_image_tokens). Without images the prompt is
    tokenised whole and any tag stays text.
    """
    if not num_image_tokens:
        return list(tokenizer(prompt)["input_ids"])
    tags = [int(tag[len("<|image_") : -len("|>")]) for tag in _IMAGE_TAGS.findall(prompt)]
    if sorted(set(tags)) != list(range(1, len(num_image_tokens) + 1)):
        raise ValueError(
            f"image tags {tags} in {prompt!r} do not number {len(num_image_tokens)} image(s) as 1..n"
        )
    chunks = _IMAGE_TAGS.split(prompt)
    ids = list(tokenizer(chunks[0])["input_ids"])
    for tag, chunk in zip(tags, chunks[1:], strict=True):
        ids += [-tag] * num_image_tokens[tag - 1]
        ids += tokenizer(chunk)["input_ids"]
    return ids


@dataclass(frozen=True)
class Phi3VInputs:
    """Phi-3.5-V: HD crops (the model's ``num_crops``) and padded HD size; images as negative ids."""

    cfg: Phi3VConfig
    processor: Phi3VImageProcessor = field(init=False)

    def __post_init__(self) -> None:
        processor = Phi3VImageProcessor(
            num_crops=self.cfg.num_crops, crop_size=self.cfg.crop_size, patch_size=self.cfg.vision.patch_size
        )
        object.__setattr__(self, "processor", processor)

    @property
    def max_image_tokens(self) -> int:
        return self.cfg.max_image_tokens

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        return None

    @property
    def min_image_tokens(self) -> int:
        return self.cfg.num_image_tokens(1, 1)

    def num_tokens(self, height: int, width: int) -> int:
        return self.processor.num_tokens(height, width)

    def num_tiles(self, arrays: Arrays) -> int:
        height, width = (int(v) for v in arrays["image_sizes"])
        size = self.cfg.crop_size
        return 1 + (height // size) * (width // size) if height else 0  # the global view, then the crops

    def process(self, image: ImageInput) -> tuple[Arrays, int]:
        processed = self.processor(image)  # already num_crops + 1 crops
        arrays = {
            "pixel_values": processed.pixel_values,
            "image_sizes": np.asarray(processed.image_size, np.int32),
        }
        return arrays, processed.num_tokens

    def empty(self) -> Arrays:
        size = self.cfg.crop_size
        return {
            "pixel_values": np.zeros((self.cfg.max_crops, 3, size, size), np.float32),
            "image_sizes": np.zeros(2, np.int32),
        }

    def ids(self, tokenizer: PreTrainedTokenizerBase, prompt: str, num_tokens: int | None) -> list[int]:
        return phi3_v_ids(tokenizer, prompt, () if num_tokens is None else (num_tokens,))
