"""Bare decoder language models (``llama``, ``mistral``, ``phi3``, ``qwen2``): UniME's stage-1 students and
the LMs inside the VLMs, converted and embedded on their own.

They differ only by config (one decoder serves all four). A text-only LM takes the prompts of
the VLM it comes from: Phi-3(.5)-mini is Phi-3.5-V's LM, Mistral is LLaVA-1.6-Mistral's (Llama, as
in LLaVA-1.6-Vicuna, gets the same ``[INST]`` form), Qwen2 is LLaVA-OneVision's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from unime_jax.backbones import llava_next, llava_onevision, phi3_v
from unime_jax.backbones.decoder_hf import decoder_from_hf, decoder_to_hf, lm_targets
from unime_jax.backbones.spec import BackboneSpec
from unime_jax.models.decoder import DecoderConfig, DecoderLM
from unime_jax.processing.featurizer import Arrays
from unime_jax.processing.images import ImageInput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["SPECS", "TextOnlyInputs"]


@dataclass(frozen=True)
class TextOnlyInputs:
    """A bare decoder LM: the whole prompt tokenised once, no images."""

    cfg: DecoderConfig

    @property
    def max_image_tokens(self) -> int:
        return 0

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        return None

    @property
    def min_image_tokens(self) -> int:
        return 0

    def num_tokens(self, height: int, width: int) -> int:
        raise ValueError(f"a text-only {self.cfg.family} model takes no images")

    def num_tiles(self, arrays: Arrays) -> int:
        return 0

    def process(self, image: ImageInput) -> tuple[Arrays, int]:
        raise ValueError(f"a text-only {self.cfg.family} model takes no images")

    def empty(self) -> Arrays:
        return {}

    def ids(self, tokenizer: PreTrainedTokenizerBase, prompt: str, num_tokens: int | None) -> list[int]:
        return list(tokenizer(prompt)["input_ids"])


def _lm_targets(cfg: DecoderConfig) -> str:
    return lm_targets(cfg.family)


def _spec(model_type: str, vlm: BackboneSpec) -> BackboneSpec:
    return BackboneSpec(
        model_type,
        DecoderConfig,
        DecoderLM,
        decoder_from_hf,
        decoder_to_hf,
        templates=vlm.templates,
        inputs=TextOnlyInputs,
        lm_targets=_lm_targets,
        mmeb_max_len=vlm.mmeb_max_len,
    )


SPECS = (
    _spec("llama", llava_next.SPEC),
    _spec("mistral", llava_next.SPEC),
    _spec("phi3", phi3_v.SPEC),
    _spec("qwen2", llava_onevision.SPEC),
)
