"""Prompts: how a row's text and image become one prompt string, and the padded lengths of its ids.

Three prompt modes (:class:`PromptFormat`):

- **template** (default): the backbone's UniME "in one word" templates (:class:`Templates`), the
  ones UniME's retrieval evaluation uses, one for a text and one for an image. A row with both an
  image and a text has no template there (UniME† embeds the two separately and sums them), so it
  needs one of:
- **instruction**: an MMEB-style instruction, e.g. ``"<|image_1|>\\nRepresent the given image with
  the following question: {text}\\n"``. ``{text}`` marks where the row's text goes; without it the
  text is appended after one space. For rows with an image the instruction must hold the image
  placeholder; when it does not, the placeholder and a newline are prepended (MMEB's own layout).
- **raw**: the text exactly as given (stage 2 and MMEB feed the data strings with no template).
  As with instructions, an image row whose text lacks the placeholder gets it prepended.

Image placeholders are written Phi-3-V style, ``<|image_1|>`` (as MMEB stores them), and mapped to
the backbone's own spelling (``Templates.placeholder``), as VLM2Vec does. A placeholder in a row
*without* an image is left as text, which is what the references do with MMEB's WebQA queries.
How a prompt becomes token ids is the backbone's (``unime_jax.backbones``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["IMAGE_TAG", "TEXT_SLOT", "PromptFormat", "Templates", "bucket_length", "length_buckets", "pad_ids"]

IMAGE_TAG = "<|image_1|>"  # MMEB's and Phi-3-V's placeholder for the (one) image of a row
TEXT_SLOT = "{text}"  # where a row's text goes in a template or an instruction


@dataclass(frozen=True)
class Templates:
    """One backbone's "in one word" prompts (text with a ``{text}`` slot, image) and image placeholder."""

    text: str
    image: str
    placeholder: str  # the backbone's spelling of MMEB's <|image_1|>


def _fill(frame: str, text: str) -> str:
    # str.replace, not str.format: texts and instructions may hold braces.
    return frame.replace(TEXT_SLOT, text)


@dataclass(frozen=True)
class PromptFormat:
    """How a row's text and image become one prompt string (see the module docstring)."""

    templates: Templates
    raw: bool = False
    instruction: str | None = None

    def __post_init__(self) -> None:
        if self.raw and self.instruction is not None:
            raise ValueError(
                "raw=True uses texts exactly as given; it cannot be combined with an instruction"
            )

    @property
    def placeholder(self) -> str:
        return self.templates.placeholder

    def adapt(self, prompt: str) -> str:
        """MMEB's ``<|image_1|>`` in the backbone's own spelling."""
        return prompt.replace(IMAGE_TAG, self.placeholder)

    def _instruction_frame(self) -> str:
        assert self.instruction is not None
        if TEXT_SLOT in self.instruction:
            return self.instruction
        return f"{self.instruction} {TEXT_SLOT}"

    def text_frame(self) -> str:
        """The prompt of a text-only row, with a ``{text}`` slot (used for truncation-aware tokenising)."""
        if self.raw:
            return TEXT_SLOT
        if self.instruction is not None:
            return self.adapt(self._instruction_frame())
        return self.templates.text

    def text_prompt(self, text: str) -> str:
        """The prompt of a text-only row."""
        return _fill(self.text_frame(), self.adapt(text))

    def image_prompt(self, text: str | None) -> str:
        """The prompt of a row with an image and an optional text; it holds the placeholder exactly once."""
        if self.raw:
            prompt = text or ""
        elif self.instruction is not None:
            prompt = _fill(self._instruction_frame(), text) if text else _fill(self.instruction, "")
        elif text:
            raise ValueError(
                "the UniME templates cover a text or an image, not both: pass an MMEB-style "
                "instruction (e.g. '<|image_1|>\\nRepresent the given image with the following "
                "question: {text}') or use raw prompts"
            )
        else:
            return self.templates.image
        prompt = self.adapt(prompt)
        if self.placeholder not in prompt:
            prompt = f"{self.placeholder}\n{prompt}" if prompt else self.placeholder
        if prompt.count(self.placeholder) != 1:
            raise ValueError(
                f"a prompt must hold the image placeholder {self.placeholder!r} once per image (one "
                f"image per row), got {prompt!r}"
            )
        return prompt


# From here on buckets are a fixed number of tokens apart instead of a ratio.
_LINEAR_FROM = 512


def length_buckets(max_len: int, smallest: int = 32) -> tuple[int, ...]:
    """Padded lengths up to ``max_len``: 32, 48, 64, 96, ..., 384, 512 (steps of at most 1.5×),
    then every 128 tokens up to 1024 and every 256 beyond (640, 768, 896, 1024, 1280, 1536, ...),
    then ``max_len``.

    Few distinct lengths keep the number of compilations small. Lengths above 512 are mostly rows
    with an image (LLaVA-1.6's 1176-2928 image tokens, Phi-3.5-V's 313 and up), where 1.5× steps
    padded a 1225-token row to 1536 and a 2389-token one to 3072 (+30%); fixed steps bound the
    padding to 25% just above 512 and 1024 and to 12.5% above 2048 (1225 -> 1280, 2389 -> 2560),
    for four buckets per 1024 tokens, each compiled only when a batch needs it.
    """
    buckets = []
    size = smallest
    while size < _LINEAR_FROM:
        buckets += [b for b in (size, size * 3 // 2) if b < _LINEAR_FROM]
        size *= 2
    size = max(smallest, _LINEAR_FROM)
    while size < max_len:
        buckets.append(size)
        size += 128 if size < 1024 else 256
    return (*sorted({b for b in buckets if b < max_len}), max_len)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` tokens."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(f"{length} tokens do not fit the longest padded length {buckets[-1]}")


def pad_ids(ids: Sequence[int], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int32, right-padded to ``length``; the mask is 1 on every real
    token, image placeholders (negative Phi-3-V ids) included."""
    if len(ids) > length:
        raise ValueError(f"{len(ids)} tokens do not fit the padded length {length}")
    input_ids = np.full(length, pad_id, np.int32)
    input_ids[: len(ids)] = ids
    mask = np.zeros(length, np.int32)
    mask[: len(ids)] = 1
    return input_ids, mask
