"""Prompts and token ids the way UniME feeds its backbones.

Three prompt modes (:class:`PromptFormat`):

- **template** (default): the E5-V/UniME "in one word" chat templates UniME's retrieval evaluation
  uses (unime.md §1.1), one for text and one for an image. A row with both an image and a text has
  no template there (UniME† embeds the two separately and sums them), so it needs one of:
- **instruction**: an MMEB-style instruction, e.g. ``"<|image_1|>\\nRepresent the given image with
  the following question: {text}\\n"``. ``{text}`` marks where the row's text goes; without it the
  text is appended after one space. For rows with an image the instruction must hold the image
  placeholder; when it does not, ``"<|image_1|>\\n"`` is prepended (MMEB's own layout).
- **raw**: the text exactly as given (stage 2 and MMEB feed the data strings with no template).
  As with instructions, an image row whose text lacks the placeholder gets it prepended.

Image placeholders are written Phi-3-V style, ``<|image_1|>`` (as MMEB stores them), and mapped to
``<image>`` for LLaVA-NeXT, as VLM2Vec does. A placeholder in a row *without* an image is left as
text, which is what the references do with MMEB's WebQA queries.

Token ids follow the reference processors: LLaVA-NeXT tokenises the whole prompt once (one BOS)
and widens its ``<image>`` token into one ``image_token_index`` per image token
(``LlavaNextProcessor``); Phi-3-V tokenises each text chunk between image tags separately, each
with its own BOS, and writes image n as ``num_tokens`` copies of ``-n`` (``Phi3VProcessor``,
backbones_mmeb.md §1.5). Text-only rows are tokenised whole by both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IMAGE_TAG",
    "LLAVA_IMAGE_TOKEN",
    "TEMPLATES",
    "TEXT_SLOT",
    "PromptFormat",
    "Style",
    "Templates",
    "bucket_length",
    "length_buckets",
    "llava_next_ids",
    "pad_ids",
    "phi3_v_ids",
    "style_for",
]

IMAGE_TAG = "<|image_1|>"  # MMEB's and Phi-3-V's placeholder for the (one) image of a row
LLAVA_IMAGE_TOKEN = "<image>"
TEXT_SLOT = "{text}"  # where a row's text goes in a template or an instruction
_IMAGE_TAGS = re.compile(r"<\|image_\d+\|>")  # Phi3VProcessor's split pattern

Style = Literal["phi3_v", "llava_next"]


@dataclass(frozen=True)
class Templates:
    """One backbone's "in one word" prompts (text with a ``{text}`` slot, image) and image placeholder."""

    text: str
    image: str
    placeholder: str


# Verbatim from deepglint/UniME self_evaluate (copied from kongds/E5-V retrieval.py); no space before
# <|end|>, no space after [/INST].
TEMPLATES: dict[Style, Templates] = {
    "phi3_v": Templates(
        text="<|user|>\n{text}\nSummary above sentence in one word:<|end|>\n<|assistant|>\n",
        image="<|user|>\n<|image_1|>\nSummary above image in one word:<|end|>\n<|assistant|>\n",
        placeholder=IMAGE_TAG,
    ),
    "llava_next": Templates(
        text="[INST] {text}\nSummary above sentence in one word: [/INST]",
        image="[INST] <image>\nSummary above image in one word: [/INST]",
        placeholder=LLAVA_IMAGE_TOKEN,
    ),
}

# Text-only decoders take the prompts of the VLM they come from: Phi-3(.5)-mini is Phi-3.5-V's LM,
# Mistral is LLaVA-1.6-Mistral's (Llama, as in LLaVA-1.6-Vicuna, gets the same [INST] form).
_STYLES: dict[str, Style] = {
    "phi3_v": "phi3_v",
    "phi3": "phi3_v",
    "llava_next": "llava_next",
    "mistral": "llava_next",
    "llama": "llava_next",
}


def style_for(model_type: str) -> Style:
    """The prompt style of an HF model type (or decoder family)."""
    if model_type not in _STYLES:
        raise ValueError(f"no prompt style for model type {model_type!r}; known: {sorted(_STYLES)}")
    return _STYLES[model_type]


def _fill(frame: str, text: str) -> str:
    # str.replace, not str.format: texts and instructions may hold braces.
    return frame.replace(TEXT_SLOT, text)


@dataclass(frozen=True)
class PromptFormat:
    """How a row's text and image become one prompt string (see the module docstring)."""

    style: Style
    raw: bool = False
    instruction: str | None = None

    def __post_init__(self) -> None:
        if self.raw and self.instruction is not None:
            raise ValueError(
                "raw=True uses texts exactly as given; it cannot be combined with an instruction"
            )
        if self.style not in TEMPLATES:
            raise ValueError(f"unknown prompt style {self.style!r}; known: {sorted(TEMPLATES)}")

    @property
    def placeholder(self) -> str:
        return TEMPLATES[self.style].placeholder

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
        return TEMPLATES[self.style].text

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
            return TEMPLATES[self.style].image
        prompt = self.adapt(prompt)
        if self.placeholder not in prompt:
            prompt = f"{self.placeholder}\n{prompt}" if prompt else self.placeholder
        if prompt.count(self.placeholder) != 1:
            raise ValueError(
                f"a prompt must hold the image placeholder {self.placeholder!r} once per image (one "
                f"image per row), got {prompt!r}"
            )
        return prompt


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


def length_buckets(max_len: int, smallest: int = 32) -> tuple[int, ...]:
    """Padded lengths up to ``max_len``: 32, 48, 64, 96, 128, 192, ... (≤ 1.5× waste), then ``max_len``.

    Few distinct lengths keep the number of compilations small; the 1.5 steps keep padding waste
    lower than powers of two would.
    """
    buckets = []
    size = smallest
    while size < max_len:
        buckets += [size, size * 3 // 2]
        size *= 2
    return (*sorted(b for b in buckets if b < max_len), max_len)


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
