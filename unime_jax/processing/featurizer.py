"""Backbone featurizers: one (text, image) input → the arrays the backbone's ``__call__`` takes.

:class:`BackboneFeaturizer` implements the data pipeline's ``Featurizer`` protocol (fixed shapes
on every call) and a batch API (:meth:`BackboneFeaturizer.token_ids`, :meth:`process_image`,
:meth:`collate`) the embedder uses to pad batches to a few bucketed lengths instead. What differs
between backbones is a :class:`BackboneInputs` strategy, which each backbone's file provides
(``unime_jax.backbones``): the image arrays per row, the image token count, and the token ids of
a prompt.

The fixed-shape output per row is ``input_ids`` (L,) int32, ``attention_mask`` (L,) int32, the
strategy's image arrays (zeros without an image), ``num_tiles`` (0-d int32, the image's real
tiles) and ``truncated`` (0-d bool) for the pipeline's accounting. L = ``seq_len`` = ``max_len`` + the backbone's worst-case image token count:
``max_len`` bounds the *text* (text-only inputs are cut to it, keeping their template); inputs
with an image are never cut, as in the references, and must fit ``seq_len``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from unime_jax.processing.images import ImageInput
from unime_jax.processing.prompts import PromptFormat, bucket_length, length_buckets, pad_ids
from unime_jax.processing.text import TRUNCATED, TextFeaturizer

if TYPE_CHECKING:  # the featurizer itself needs neither jax nor transformers
    from transformers import PreTrainedTokenizerBase

__all__ = ["NUM_TILES", "Arrays", "BackboneFeaturizer", "BackboneInputs"]

Arrays = dict[str, np.ndarray]
# 0-d int32 in the fixed-shape output: the image's real tiles (0 without one), which the packed
# training layout keeps while dropping the zero slots.
NUM_TILES = "num_tiles"


class BackboneInputs(Protocol):
    """What one backbone adds to the shared prompt and padding logic."""

    @property
    def max_image_tokens(self) -> int:
        """Most image tokens one image can take (0: no images)."""
        ...

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None: ...

    @property
    def min_image_tokens(self) -> int:
        """Fewest image tokens one image can take (the smallest grid, fully unpadded)."""
        ...

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens of an original image of this size, without touching its pixels."""
        ...

    def num_tiles(self, arrays: Arrays) -> int:
        """Real tiles (crops) in one image's arrays, which come first in ``pixel_values``; 0 for :meth:`empty`."""
        ...

    def process(self, image: ImageInput) -> tuple[Arrays, int]:
        """Per-image arrays (fixed shapes) and the image's token count."""
        ...

    def empty(self) -> Arrays:
        """The per-image arrays of a row without an image (zeros)."""
        ...

    def ids(self, tokenizer: PreTrainedTokenizerBase, prompt: str, num_tokens: int | None) -> list[int]:
        """Token ids of a prompt, the image widened to ``num_tokens`` (None: no image)."""
        ...


@dataclass(frozen=True)
class BackboneFeaturizer:
    """Prompt formatting, tokenising and image processing for one backbone.

    Args:
      inputs: the backbone's strategy (``BackboneSpec.inputs``; ``BackboneSpec.featurizer`` builds
        the whole featurizer).
      tokenizer: the backbone's HF tokenizer (adds BOS, no EOS).
      prompt: how texts and images become prompts (its style must be the backbone's).
      max_len: the most text tokens of a text-only input (the references' ``max_len``); longer
        texts are shortened so the whole prompt fits, keeping the template's own tokens.
    """

    inputs: BackboneInputs
    tokenizer: PreTrainedTokenizerBase
    prompt: PromptFormat
    max_len: int = 512
    _text: TextFeaturizer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.inputs.check_tokenizer(self.tokenizer)
        # Text-only rows: TextFeaturizer's template-preserving truncation, with this prompt's frame.
        object.__setattr__(
            self, "_text", TextFeaturizer(self.tokenizer, self.max_len, self.prompt.text_frame())
        )

    @property
    def seq_len(self) -> int:
        """The fixed padded length of :meth:`__call__`: text budget plus the worst-case image."""
        return self.max_len + self.inputs.max_image_tokens

    @property
    def buckets(self) -> tuple[int, ...]:
        """The padded lengths :meth:`collate` chooses from."""
        return length_buckets(self.seq_len)

    @property
    def pad_id(self) -> int:
        return self._text.pad_id

    def token_ids(self, text: str | None, num_image_tokens: int | None = None) -> tuple[list[int], bool]:
        """Ids of one input and whether its text was shortened.

        ``num_image_tokens`` is the image's token count (:meth:`num_image_tokens`, or what
        :meth:`process_image` returned); None for an input without an image.
        """
        if num_image_tokens is None:
            if not text:
                raise ValueError("an input needs a text or an image; got an empty text and no image")
            return self._text.encode(self.prompt.adapt(text))
        ids = self.inputs.ids(self.tokenizer, self.prompt.image_prompt(text), num_image_tokens)
        if len(ids) > self.seq_len:
            raise ValueError(
                f"an input with an image is {len(ids)} tokens ({num_image_tokens} for the image), more "
                f"than seq_len={self.seq_len}; inputs with images are not truncated: raise max_len"
            )
        return ids, False

    def num_image_tokens(self, height: int, width: int) -> int:
        return self.inputs.num_tokens(height, width)

    def process_image(self, image: ImageInput) -> tuple[Arrays, int]:
        """Per-image model arrays and the image's token count."""
        return self.inputs.process(image)

    def __call__(self, text: str, image: ImageInput | None = None) -> Arrays:
        """The data pipeline's ``Featurizer``: fixed shapes, image arrays zero without an image."""
        if image is None:
            arrays, num_tokens = self.inputs.empty(), None
        else:
            arrays, num_tokens = self.process_image(image)
        ids, truncated = self.token_ids(text, num_tokens)
        input_ids, attention_mask = pad_ids(ids, self.seq_len, self.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **arrays,
            NUM_TILES: np.int32(self.inputs.num_tiles(arrays)),
            TRUNCATED: np.bool_(truncated),
        }

    def collate(
        self, ids: Sequence[Sequence[int]], images: Sequence[Arrays | None], length: int | None = None
    ) -> Arrays:
        """A batch: ids right-padded to ``length`` (default: the bucket of the longest row).

        Image arrays are stacked (zeros for rows without one) only when some row has an image, so
        text-only batches run the bare language model. ``pixel_values`` keeps as many tile slots
        as the batch's largest real tile count, each row's real tiles first and zeros after them:
        the models run CLIP on every slot they are given, so batching rows of equal tile counts
        together spares the padded ones.
        """
        length = length or bucket_length(max(len(row) for row in ids), self.buckets)
        padded = [pad_ids(row, length, self.pad_id) for row in ids]
        batch = {
            "input_ids": np.stack([p[0] for p in padded]),
            "attention_mask": np.stack([p[1] for p in padded]),
        }
        if any(image is not None for image in images):
            empty = self.inputs.empty()
            rows = [empty if image is None else image for image in images]
            batch |= {key: np.stack([row[key] for row in rows]) for key in empty if key != "pixel_values"}
            tiles = [self.inputs.num_tiles(row) for row in rows]
            pixels = np.zeros(
                (len(rows), max(tiles), *empty["pixel_values"].shape[1:]), empty["pixel_values"].dtype
            )
            for slots, row, count in zip(pixels, rows, tiles, strict=True):
                slots[:count] = row["pixel_values"][:count]
            batch["pixel_values"] = pixels
        return batch
