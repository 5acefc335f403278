"""Backbone featurizers: one (text, image) input → the arrays the backbone's ``__call__`` takes.

:class:`BackboneFeaturizer` implements the data pipeline's ``Featurizer`` protocol (fixed shapes
on every call) and a batch API (:meth:`BackboneFeaturizer.token_ids`, :meth:`process_image`,
:meth:`collate`) the embedder uses to pad batches to a few bucketed lengths instead. What differs
between backbones sits in a small strategy, one per model family:

==================  ==================================================================================
strategy            arrays (per row, fixed-shape featurizer output)
==================  ==================================================================================
TextOnlyInputs      input_ids (L,) int32, attention_mask (L,) int32          (llama/mistral/phi3 LMs)
LlavaNextInputs     + pixel_values (P, 3, S, S) float32, P = max_image_patches (base tile first, zero
                    padded); image_sizes (2,) int32 original (H, W); image_grids (2,) int32 (rows, cols)
                    of the chosen pinpoint; both (0, 0) without an image
Phi3VInputs         + pixel_values (num_crops + 1, 3, S, S) float32, global view first, zero padded;
                    image_sizes (2,) int32 padded HD (H, W), (0, 0) without an image
==================  ==================================================================================

plus ``truncated`` (0-d bool) for the pipeline's accounting. L = ``seq_len`` = ``max_len`` + the
backbone's worst-case image token count: ``max_len`` bounds the *text* (text-only inputs are cut
to it, keeping their template); inputs with an image are never cut, as in the references, and
must fit ``seq_len``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from unime_jax.data.featurize import TRUNCATED, TextFeaturizer
from unime_jax.processing.images import ImageInput
from unime_jax.processing.images_llava import LlavaNextImageProcessor
from unime_jax.processing.images_phi3v import Phi3VImageProcessor
from unime_jax.processing.prompts import (
    LLAVA_IMAGE_TOKEN,
    PromptFormat,
    Style,
    bucket_length,
    length_buckets,
    llava_next_ids,
    pad_ids,
    phi3_v_ids,
    style_for,
)

if TYPE_CHECKING:  # the featurizer itself needs neither jax nor transformers
    from transformers import PreTrainedTokenizerBase

    from unime_jax.models.llava_next import LlavaNextConfig
    from unime_jax.models.phi3_v import Phi3VConfig

__all__ = [
    "BackboneFeaturizer",
    "BackboneInputs",
    "LlavaNextInputs",
    "Phi3VInputs",
    "TextOnlyInputs",
    "backbone_inputs",
]

Arrays = dict[str, np.ndarray]


class BackboneInputs(Protocol):
    """What one model family adds to the shared prompt and padding logic."""

    @property
    def style(self) -> Style: ...

    @property
    def max_image_tokens(self) -> int:
        """Most image tokens one image can take (0: no images)."""
        ...

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None: ...

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens of an original image of this size, without touching its pixels."""
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
class TextOnlyInputs:
    """A bare decoder LM (stage-1 student, tests): prompts of the VLM it comes from, no images."""

    family: str  # DecoderConfig.family: llama, mistral or phi3

    @property
    def style(self) -> Style:
        return style_for(self.family)

    @property
    def max_image_tokens(self) -> int:
        return 0

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        return None

    def num_tokens(self, height: int, width: int) -> int:
        raise ValueError(f"a text-only {self.family} model takes no images")

    def process(self, image: ImageInput) -> tuple[Arrays, int]:
        raise ValueError(f"a text-only {self.family} model takes no images")

    def empty(self) -> Arrays:
        return {}

    def ids(self, tokenizer: PreTrainedTokenizerBase, prompt: str, num_tokens: int | None) -> list[int]:
        return list(tokenizer(prompt)["input_ids"])


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
    def style(self) -> Style:
        return "llava_next"

    @property
    def max_image_tokens(self) -> int:
        return self.cfg.max_image_tokens

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        ids = tokenizer(LLAVA_IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
        if list(ids) != [self.cfg.image_token_index]:
            raise ValueError(
                f"the tokenizer must turn {LLAVA_IMAGE_TOKEN!r} into the one token "
                f"image_token_index={self.cfg.image_token_index}, got {list(ids)}; llava-hf tokenizers "
                f"do (add it with tokenizer.add_special_tokens otherwise)"
            )

    def num_tokens(self, height: int, width: int) -> int:
        return self.processor.num_tokens(height, width)

    def process(self, image: ImageInput) -> tuple[Arrays, int]:
        processed = self.processor(image)
        pixel_values = np.zeros((self.cfg.max_image_patches, *processed.pixel_values.shape[1:]), np.float32)
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
            "pixel_values": np.zeros((self.cfg.max_image_patches, 3, size, size), np.float32),
            "image_sizes": np.zeros(2, np.int32),
            "image_grids": np.zeros(2, np.int32),
        }

    def ids(self, tokenizer: PreTrainedTokenizerBase, prompt: str, num_tokens: int | None) -> list[int]:
        return llava_next_ids(tokenizer, prompt, self.cfg.image_token_index, num_tokens)


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
    def style(self) -> Style:
        return "phi3_v"

    @property
    def max_image_tokens(self) -> int:
        return self.cfg.max_image_tokens

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        return None

    def num_tokens(self, height: int, width: int) -> int:
        return self.processor.num_tokens(height, width)

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


def backbone_inputs(model_type: str, cfg: Any) -> BackboneInputs:
    """The strategy for a registry model type and its architecture config."""
    if model_type == "llava_next":
        return LlavaNextInputs(cfg)
    if model_type == "phi3_v":
        return Phi3VInputs(cfg)
    if model_type in ("llama", "mistral", "phi3"):
        return TextOnlyInputs(cfg.family)
    raise ValueError(
        f"no featurizer for model type {model_type!r} (llava_next, phi3_v, llama, mistral, phi3)"
    )


@dataclass(frozen=True)
class BackboneFeaturizer:
    """Prompt formatting, tokenising and image processing for one backbone.

    Args:
      inputs: the model family's strategy (:func:`backbone_inputs`).
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
        if self.prompt.style != self.inputs.style:
            raise ValueError(
                f"prompt style {self.prompt.style!r} is not the backbone's {self.inputs.style!r}"
            )
        self.inputs.check_tokenizer(self.tokenizer)
        # Text-only rows: TextFeaturizer's template-preserving truncation, with this prompt's frame.
        object.__setattr__(
            self, "_text", TextFeaturizer(self.tokenizer, self.max_len, self.prompt.text_frame())
        )

    @classmethod
    def for_model(
        cls,
        model_type: str,
        cfg: Any,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_len: int = 512,
        prompt: PromptFormat | None = None,
    ) -> BackboneFeaturizer:
        """The featurizer of a registry model type; ``prompt`` defaults to its UniME templates."""
        inputs = backbone_inputs(model_type, cfg)
        return cls(inputs, tokenizer, prompt or PromptFormat(inputs.style), max_len)

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
            TRUNCATED: np.bool_(truncated),
        }

    def collate(
        self, ids: Sequence[Sequence[int]], images: Sequence[Arrays | None], length: int | None = None
    ) -> Arrays:
        """A batch: ids right-padded to ``length`` (default: the bucket of the longest row).

        Image arrays are stacked (zeros for rows without one) only when some row has an image, so
        text-only batches run the bare language model.
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
            batch |= {key: np.stack([row[key] for row in rows]) for key in empty}
        return batch
