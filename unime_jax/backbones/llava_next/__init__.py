"""LLaVA-NeXT (``llava_next``: LLaVA-1.6, the UniME-LLaVA-1.6 release): everything specific to it.

- ``hf_config``: config.json both ways, the transformers 4/5 tensor-name layouts;
- ``images``: the anyres image processor and llava-hf's default pinpoints;
- ``inputs``: the input strategy (tiles, image sizes and grids, ``<image>`` widened in the ids);
- here: UniME's prompts in LLaVA's ``[INST]`` format, the tokenizer fix-up, where the decoder and
  the vision tower sit (LoRA targets), the official MMEB text budget, and the :data:`SPEC`.
"""

from __future__ import annotations

from typing import Any

from unime_jax.backbones.clip import attention_targets
from unime_jax.backbones.decoder_hf import lm_targets
from unime_jax.backbones.llava_next.hf_config import KEY_LAYOUTS, llava_next_from_hf, llava_next_to_hf
from unime_jax.backbones.llava_next.images import LLAVA_V16_PINPOINTS
from unime_jax.backbones.llava_next.inputs import IMAGE_TOKEN, LlavaNextInputs
from unime_jax.backbones.llava_next.reference import reference_model
from unime_jax.backbones.spec import BackboneSpec
from unime_jax.models.llava_next import LlavaNext, LlavaNextConfig
from unime_jax.processing.prompts import Templates

__all__ = ["IMAGE_TOKEN", "LLAVA_V16_PINPOINTS", "SPEC", "TEMPLATES", "add_image_token", "language_model_targets"]

# Verbatim from deepglint/UniME self_evaluate (itself copied from kongds/E5-V retrieval.py): no
# space after [/INST].
TEMPLATES = Templates(
    text="[INST] {text}\nSummary above sentence in one word: [/INST]",
    image="[INST] <image>\nSummary above image in one word: [/INST]",
    placeholder=IMAGE_TOKEN,
)


def add_image_token(tokenizer: Any) -> Any:
    """llava-hf tokenizers know ``<image>``; a base Mistral/Llama tokenizer gets it added (id = its size)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def language_model_targets(cfg: LlavaNextConfig) -> str:
    """LoRA targets of the LLaVA family's decoder, which sits under ``language_model.``."""
    return lm_targets(cfg.text.family, prefix="language_model.")


SPEC = BackboneSpec(
    "llava_next",
    LlavaNextConfig,
    LlavaNext,
    llava_next_from_hf,
    llava_next_to_hf,
    key_layouts=KEY_LAYOUTS,
    templates=TEMPLATES,
    inputs=LlavaNextInputs,
    prepare_tokenizer=add_image_token,
    lm_targets=language_model_targets,
    vision_targets=attention_targets(r"vision_tower\."),
    vision_tower="vision_tower",
    mmeb_max_len=4096,  # UniME's README MMEB command (VLM2Vec eval.py --max_len 4096)
    reference=reference_model,
)
