"""Named LoRA target lists that are not one backbone's: PEFT-style module-name lists.

PEFT matches a ``target_modules`` list by the module's last name(s): a module is adapted when its
dotted path equals a listed name or ends in ``.<name>``. :func:`module_names_regex` turns such a
list into the ``re.fullmatch`` regex our ``apply_lora`` takes, so a list reaches exactly the modules
PEFT's would on the same tree (our module paths mirror HF's).

VLM2Vec's list (``TIGER-AI-Lab/VLM2Vec@v1 src/model.py``, kept by the UniME authors' later code)
names both Phi-3's fused projections and Llama/Mistral's separate ones, and so reaches, per backbone:

===================  ==============================================  ==============================
backbone             language model (every layer)                    vision tower (every layer)
===================  ==============================================  ==============================
``phi3_v``           ``qkv_proj``, ``o_proj``, ``gate_up_proj``,      CLIP's
                     ``down_proj`` (all of its projections)          ``self_attn.{q,k,v,out}_proj``
``llava_next``       ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,  CLIP's
                     ``down_proj``; not ``gate_proj``/``up_proj``    ``self_attn.{q,k,v,out}_proj``
``llava_onevision``  as ``llava_next`` (a Qwen2 LM)                  SigLIP's
                                                                     ``self_attn.{q,k,v,out}_proj``
``phi3``             as ``phi3_v``                                   (none)
``llama``,           as ``llava_next``                               (none)
``mistral``,
``qwen2``
===================  ==============================================  ==============================

Neither list reaches the towers' MLPs (``fc1``/``fc2``), the projectors or ``lm_head``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["PRESETS", "VLM2VEC_MODULES", "module_names_regex"]

VLM2VEC_MODULES = (
    "qkv_proj",
    "o_proj",
    "gate_up_proj",
    "down_proj",
    "k_proj",
    "q_proj",
    "out_proj",
    "v_proj",
)
# `lora.preset` values; "unime" is the backbone's own choice (BackboneSpec.lm_targets/vision_targets).
PRESETS = ("unime", "vlm2vec")


def module_names_regex(names: Sequence[str]) -> str:
    """The fullmatch regex of PEFT's ``target_modules=[names]``: any path ending in one of the names."""
    return rf"(.*\.)?({'|'.join(re.escape(name) for name in names)})"
