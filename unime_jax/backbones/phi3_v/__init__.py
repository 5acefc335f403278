"""Phi-3.5-V (``phi3_v``, remote code; the UniME-Phi3.5-V release): everything specific to it.

- ``hf_config``: config.json both ways, and ``num_crops`` from preprocessor_config.json;
- ``images``: the HD-crop image processor;
- ``inputs``: the input strategy (crops, padded HD sizes, images as negative ids);
- here: UniME's prompts in Phi-3's chat format, where the decoder and the vision tower sit (LoRA
  targets), the official MMEB text budget, and the :data:`SPEC`.
"""

from __future__ import annotations

from unime_jax.backbones.clip import attention_targets
from unime_jax.backbones.decoder_hf import lm_targets
from unime_jax.backbones.phi3_v.hf_config import phi3_v_from_hf, phi3_v_to_hf, processor_settings
from unime_jax.backbones.phi3_v.inputs import Phi3VInputs
from unime_jax.backbones.phi3_v.reference import reference_model
from unime_jax.backbones.spec import BackboneSpec
from unime_jax.models.phi3_v import Phi3VConfig, Phi3VForCausalLM
from unime_jax.processing.prompts import IMAGE_TAG, Templates

__all__ = ["SPEC", "TEMPLATES"]

# Verbatim from deepglint/UniME self_evaluate (itself copied from kongds/E5-V retrieval.py): no
# space before <|end|>.
TEMPLATES = Templates(
    text="<|user|>\n{text}\nSummary above sentence in one word:<|end|>\n<|assistant|>\n",
    image="<|user|>\n<|image_1|>\nSummary above image in one word:<|end|>\n<|assistant|>\n",
    placeholder=IMAGE_TAG,
)


def _lm_targets(cfg: Phi3VConfig) -> str:
    return lm_targets(cfg.text.family)


SPEC = BackboneSpec(
    "phi3_v",
    Phi3VConfig,
    Phi3VForCausalLM,
    phi3_v_from_hf,
    phi3_v_to_hf,
    # The image embedding's `wte` is embed_tokens itself; checkpoints that store it hold a copy.
    aliases=(r"^model\.vision_embed_tokens\.wte\.weight$",),
    processor_settings=processor_settings,
    templates=TEMPLATES,
    inputs=Phi3VInputs,
    lm_targets=_lm_targets,
    vision_targets=attention_targets(r"model\.vision_embed_tokens\.img_processor\."),
    vision_tower="model.vision_embed_tokens.img_processor",
    mmeb_max_len=256,  # UniME's README MMEB command (VLM2Vec eval.py --max_len 256)
    reference=reference_model,
)
