"""One place per backbone type: everything specific to it, behind a :class:`BackboneSpec`.

==========================  ======================================================================
module                      model types
==========================  ======================================================================
``llava_next/``             ``llava_next`` (LLaVA-1.6, UniME-LLaVA-1.6)
``phi3_v/``                 ``phi3_v`` (Phi-3.5-V, UniME-Phi3.5-V)
``llava_onevision/``        ``llava_onevision`` (LLaVA-OneVision, UniME-LLaVA-OneVision; single images)
``text_lm``                 ``llama``, ``mistral``, ``phi3``, ``qwen2`` (bare decoders: stage-1 students)
``clip``                    ``clip_vision_model`` (the vision tower on its own)
``siglip``                  ``siglip_vision_model`` (the tower on its own, without the pooling head)
==========================  ======================================================================

Shared by several: ``decoder_hf`` (the decoder families' config mapping and LoRA names),
``clip`` (the tower's) and ``llava_next`` (whose glue, pixels and key layouts OneVision extends). Adding a backbone is one more such module, registered below, plus its tests
(the README's design section has the recipe).
"""

from __future__ import annotations

from unime_jax.backbones import clip, llava_next, llava_onevision, phi3_v, siglip, text_lm
from unime_jax.backbones.spec import BackboneSpec, UnsupportedModelError, with_runtime

__all__ = ["SPECS", "BackboneSpec", "UnsupportedModelError", "spec_for", "with_runtime"]

SPECS: dict[str, BackboneSpec] = {
    spec.model_type: spec
    for spec in (*text_lm.SPECS, clip.SPEC, siglip.SPEC, phi3_v.SPEC, llava_next.SPEC, llava_onevision.SPEC)
}


def spec_for(model_type: str) -> BackboneSpec:
    if model_type not in SPECS:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; supported: {sorted(SPECS)}")
    return SPECS[model_type]
