"""The featurizer protocol the data pipeline calls, and the text-only :class:`TextFeaturizer`.

The pipeline is agnostic of the backbone: it calls a :class:`Featurizer` for every side of an
example (anchor, positive, query, target, ...) and prefixes the keys with the side's role. The
multimodal one is :class:`~unime_jax.processing.featurizer.BackboneFeaturizer`;
:class:`TextFeaturizer` is the text-only one stage 1 uses (and the multimodal one uses for its
text-only rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from unime_jax.processing.prompts import TEXT_SLOT as _PLACEHOLDER

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedTokenizerBase

__all__ = ["TRUNCATED", "Featurizer", "TextFeaturizer"]

# Optional 0-d bool in a featurizer's output: the text was cut to fit max_len. The pipeline counts
# it (per-epoch "truncated" metric) and removes it before batching.
TRUNCATED = "truncated"


class Featurizer(Protocol):
    """Turns one input into a dict of numpy arrays.

    Contract, so that examples stack into static batches:
      - every call returns the same keys with the same shapes and dtypes; an input without an
        image still gets the image arrays (zeros), as VLM2Vec does for text-only rows;
      - token sequences are right-padded: ``input_ids`` and ``attention_mask`` (int32, 1 for real
        tokens), the embedding being read at the last real token;
      - image placeholders in the text (MMEB writes Phi-3's ``<|image_1|>``) are adapted to the
        backbone here, not in the data sources;
      - it may add :data:`TRUNCATED` (0-d bool) when it shortened the text;
      - it must be picklable: grain worker processes receive a copy.
    """

    def __call__(self, text: str, image: Image.Image | None) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class TextFeaturizer:
    """Text-only featurizer: prompt template → token ids, right-padded to `max_len`.

    Overlong texts are shortened so that the whole prompt fits, keeping the template's own tokens:
    the embedding is read at the prompt's last token, so cutting the end of the prompt (e.g.
    "Summary above sentence in one word:") would change what is embedded. E5-V does the same
    (truncate the sentence, decode it, then apply the template). A text without a template (raw
    MMEB strings) is cut by the tokenizer itself, as VLM2Vec's collators do (``truncation=True``).

    Args:
      tokenizer: a HuggingFace tokenizer; its special tokens (BOS) are added, no EOS is appended
        unless the tokenizer itself does so.
      max_len: the padded length and the maximum prompt length in tokens.
      template: the prompt with one ``{text}`` placeholder, e.g.
        ``"[INST] {text}\\nSummary above sentence in one word: [/INST]"``.
    """

    tokenizer: PreTrainedTokenizerBase
    max_len: int
    template: str = _PLACEHOLDER

    def __post_init__(self) -> None:
        if self.template.count(_PLACEHOLDER) != 1:
            raise ValueError(
                f"prompt template must contain {_PLACEHOLDER} exactly once, got {self.template!r}"
            )
        overhead = len(self._prompt_ids(""))
        if overhead >= self.max_len:
            raise ValueError(
                f"prompt template {self.template!r} alone is {overhead} tokens, which leaves no room "
                f"for text within max_len={self.max_len}; raise max_len or shorten the template"
            )

    @property
    def pad_id(self) -> int:
        # Llama/Mistral tokenizers have no pad token; the value under a 0 mask is never read.
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    def _prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer(self.template.replace(_PLACEHOLDER, text))["input_ids"]

    def encode(self, text: str) -> tuple[list[int], bool]:
        """Token ids of the prompt for `text` (at most `max_len`) and whether `text` was shortened."""
        ids = self._prompt_ids(text)
        if len(ids) <= self.max_len:
            return ids, False
        if self.template == _PLACEHOLDER:
            # No template to keep: cut as the references' processors do (truncation=True, max_length).
            return self.tokenizer(text, truncation=True, max_length=self.max_len)["input_ids"], True
        text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(text_ids) - (len(ids) - self.max_len)
        # Decoding a token prefix and re-tokenizing inside the template can merge differently,
        # so shrink until the prompt fits; this converges in one or two rounds.
        while keep > 0:
            shortened = self.tokenizer.decode(text_ids[:keep], skip_special_tokens=True)
            ids = self._prompt_ids(shortened)
            if len(ids) <= self.max_len:
                return ids, True
            keep -= len(ids) - self.max_len
        return self._prompt_ids(""), True  # __post_init__ guarantees the empty prompt fits

    def __call__(self, text: str, image: Image.Image | None = None) -> dict[str, np.ndarray]:
        if image is not None:
            raise ValueError(
                "TextFeaturizer is text-only; use the backbone's multimodal featurizer for images"
            )
        ids, truncated = self.encode(text)
        input_ids = np.full(self.max_len, self.pad_id, np.int32)
        input_ids[: len(ids)] = ids
        attention_mask = np.zeros(self.max_len, np.int32)
        attention_mask[: len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, TRUNCATED: np.bool_(truncated)}
