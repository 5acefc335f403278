"""One place per backbone type: everything specific to it, behind a :class:`BackboneSpec`.

==========================  ======================================================================
module                      model types
==========================  ======================================================================
``llava_next/``             ``llava_next`` (LLaVA-1.6, UniME-LLaVA-1.6)
``phi3_v/``                 ``phi3_v`` (Phi-3.5-V, UniME-Phi3.5-V)
``text_lm``                 ``llama``, ``mistral``, ``phi3`` (bare decoders: stage-1 students)
``clip``                    ``clip_vision_model`` (the vision tower on its own)
==========================  ======================================================================

Shared by several: ``decoder_hf`` (the decoder families' config mapping and LoRA names) and
``clip`` (the tower's). Adding a backbone is one more such module, registered below, plus its tests
(the README's design section has the recipe).
"""

from __future__ import annotations

from unime_jax.backbones import clip, llava_next, phi3_v, text_lm
from unime_jax.backbones.spec import BackboneSpec, UnsupportedModelError, with_runtime

__all__ = ["SPECS", "BackboneSpec", "UnsupportedModelError", "spec_for", "with_runtime"]

SPECS: dict[str, BackboneSpec] = {
    spec.model_type: spec for spec in (*text_lm.SPECS, clip.SPEC, phi3_v.SPEC, llava_next.SPEC)
}


def spec_for(model_type: str) -> BackboneSpec:
    if model_type not in SPECS:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; supported: {sorted(SPECS)}")
    return SPECS[model_type]
