"""LLaVA-OneVision (``llava_onevision``: SigLIP + Qwen2, the UniME-LLaVA-OneVision-7B release).

- ``hf_config``: config.json both ways, the processor's statistics, the transformers 4/5 layouts;
- ``images``: the image processor (LLaVA-NeXT's pixels, OneVision's anyres_max token count) and
  llava-hf's 36 default pinpoints;
- ``inputs``: the input strategy (tiles, sizes, tile and feature grids, ``<image>`` widened);
- here: UniME's prompts in Qwen2's chat format, the tokenizer fix-up, where the decoder and the
  vision tower sit (LoRA targets), the MMEB text budget, ``convert verify``'s reference
  (transformers' ``LlavaOnevisionForConditionalGeneration``, through LLaVA-NeXT's) and the :data:`SPEC`.

Single images only: several images in one row and video are HF paths this port does not implement
(``unime_jax.models.llava_onevision``).
"""

from __future__ import annotations

from unime_jax.backbones.clip import attention_targets
from unime_jax.backbones.llava_next import add_image_token, language_model_targets
from unime_jax.backbones.llava_next.inputs import IMAGE_TOKEN
from unime_jax.backbones.llava_next.reference import anyres_reference
from unime_jax.backbones.llava_onevision.hf_config import (
    KEY_LAYOUTS,
    llava_onevision_from_hf,
    llava_onevision_to_hf,
    processor_settings,
)
from unime_jax.backbones.llava_onevision.images import LLAVA_OV_PINPOINTS
from unime_jax.backbones.llava_onevision.inputs import LlavaOnevisionInputs
from unime_jax.backbones.spec import BackboneSpec
from unime_jax.models.llava_onevision import LlavaOnevision, LlavaOnevisionConfig
from unime_jax.processing.prompts import Templates

__all__ = ["IMAGE_TOKEN", "LLAVA_OV_PINPOINTS", "SPEC", "TEMPLATES"]

# E5-V's "in one word" prompts as UniME-LLaVA-OneVision's `processor.apply_chat_template` renders them
# with llava-hf's OneVision chat template (a user turn of the image, then the text, each text after a
# newline; add_generation_prompt=True), for the messages
#   [{"type": "text", "text": "{text}\nSummary above sentence in one word:"}] and
#   [{"type": "image"}, {"type": "text", "text": "Summary above image in one word:"}].
TEMPLATES = Templates(
    text="<|im_start|>user \n{text}\nSummary above sentence in one word:<|im_end|><|im_start|>assistant\n",
    image="<|im_start|>user <image>\nSummary above image in one word:<|im_end|><|im_start|>assistant\n",
    placeholder=IMAGE_TOKEN,
)


SPEC = BackboneSpec(
    "llava_onevision",
    LlavaOnevisionConfig,
    LlavaOnevision,
    llava_onevision_from_hf,
    llava_onevision_to_hf,
    key_layouts=KEY_LAYOUTS,
    processor_settings=processor_settings,
    templates=TEMPLATES,
    inputs=LlavaOnevisionInputs,
    prepare_tokenizer=add_image_token,
    lm_targets=language_model_targets,
    vision_targets=attention_targets(r"vision_tower\."),
    vision_tower="vision_tower",
    # The release documents no MMEB command; LLaVA-1.6's (VLM2Vec eval.py --max_len 4096) is kept.
    mmeb_max_len=4096,
    reference=anyres_reference("LlavaOnevisionForConditionalGeneration", LlavaOnevisionInputs),
)
