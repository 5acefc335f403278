"""LLaVA-NeXT's input strategy: anyres tiles, the image's size and grid, and ``<image>`` widened in the ids.

Token ids follow ``LlavaNextProcessor``: the whole prompt is tokenised once (one BOS) and its
``<image>`` token is widened into one ``image_token_index`` per image token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from unime_jax.backbones.llava_next.images import LlavaNextImageProcessor
from unime_jax.models.llava_next import LlavaNextConfig
from unime_jax.processing.featurizer import Arrays
from unime_jax.processing.images import ImageInput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IMAGE_TOKEN", "LlavaNextInputs", "llava_next_ids"]

IMAGE_TOKEN = "<image>"  # llava-hf's placeholder, one special token after Mistral's 32000 pieces


def llava_next_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, image_token_index: int, num_image_tokens: int | None
) -> list[int]:
    """LLaVA-NeXT ids: the prompt tokenised once (BOS first), its image token widened to ``num_image_tokens``.

    The tokenizer must know ``<image>`` as one special token (llava-hf tokenizers do): text is split
    around special tokens before tokenising, so widening one image token after tokenising gives what
    ``LlavaNextProcessor`` gets by widening the string first. ``num_image_tokens=None``: a text-only row.
    """
    ids = list(tokenizer(prompt)["input_ids"])
    if num_image_tokens is None:
        return ids
    slots = [i for i, token in enumerate(ids) if token == image_token_index]
    if len(slots) != 1:
        raise ValueError(
            f"expected one image token (id {image_token_index}) in the tokenised prompt, found "
            f"{len(slots)}: {prompt!r}"
        )
    at = slots[0]
    return [*ids[:at], *[image_token_index] * num_image_tokens, *ids[at + 1 :]]


@dataclass(frozen=True)
class LlavaNextInputs:
    """LLaVA-NeXT: anyres tiles, original size and pinpoint grid; ``<image>`` widened in the ids."""

    cfg: LlavaNextConfig
    processor: LlavaNextImageProcessor = field(init=False)

    def __post_init__(self) -> None:
        processor = LlavaNextImageProcessor(
            image_grid_pinpoints=self.cfg.image_grid_pinpoints,
            crop_size=self.cfg.vision.image_size,
            patch_size=self.cfg.vision.patch_size,
        )
        object.__setattr__(self, "processor", processor)

    @property
    def max_image_tokens(self) -> int:
        return self.cfg.max_image_tokens

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        ids = tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
        if list(ids) != [self.cfg.image_token_index]:
            raise ValueError(
                f"the tokenizer must turn {IMAGE_TOKEN!r} into the one token "
                f"image_token_index={self.cfg.image_token_index}, got {list(ids)}; llava-hf tokenizers "
                f"do (add it with tokenizer.add_special_tokens otherwise)"
            )

    @property
    def min_image_tokens(self) -> int:
        return self.cfg.tile_side**2  # the base tile; the grid adds at least one feature row

    def num_tokens(self, height: int, width: int) -> int:
        return self.processor.num_tokens(height, width)

    def num_tiles(self, arrays: Arrays) -> int:
        rows, cols = (int(v) for v in arrays["image_grids"][:2])  # OneVision appends its feature grid
        return 1 + rows * cols if rows else 0  # the base tile, then the pinpoint grid

    def process(self, image: ImageInput) -> tuple[Arrays, int]:
        processed = self.processor(image)
        # uint8, as the processor leaves them: the vision tower normalises them on the device.
        pixel_values = np.zeros((self.cfg.max_image_patches, *processed.pixel_values.shape[1:]), np.uint8)
        pixel_values[: len(processed.pixel_values)] = processed.pixel_values
        arrays = {
            "pixel_values": pixel_values,
            "image_sizes": np.asarray(processed.image_size, np.int32),
            "image_grids": np.asarray(processed.image_grid, np.int32),
        }
        return arrays, processed.num_tokens

    def empty(self) -> Arrays:
        size = self.cfg.vision.image_size
        return {
            "pixel_values": np.zeros((self.cfg.max_image_patches, 3, size, size), np.uint8),
            "image_sizes": np.zeros(2, np.int32),
            "image_grids": np.zeros(self.cfg.image_grid_width, np.int32),
        }

    def ids(self, tokenizer: PreTrainedTokenizerBase, prompt: str, num_tokens: int | None) -> list[int]:
        return llava_next_ids(tokenizer, prompt, self.cfg.image_token_index, num_tokens)
