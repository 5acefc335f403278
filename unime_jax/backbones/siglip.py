"""The SigLIP vision tower (``siglip_vision_model``): HF config mapping, key layouts, LoRA names.

A backbone of its own for conversion and parity checks, and the tower inside LLaVA-OneVision, which
reuses its config mapping. Its encoder layers are CLIP's, so CLIP's attention names serve LoRA.
"""

from __future__ import annotations

from unime_jax.backbones.clip import CLIP_FIELDS, attention_targets, tower_to_hf
from unime_jax.backbones.spec import BackboneSpec, UnsupportedModelError
from unime_jax.models.siglip import SiglipVisionConfig, SiglipVisionModel

__all__ = ["SPEC", "siglip_from_hf", "siglip_to_hf"]

_HF_DEFAULTS = {  # transformers' SiglipVisionConfig defaults, for config.json files that omit a field
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}


def siglip_from_hf(hf: dict, **stats: tuple[float, float, float]) -> SiglipVisionConfig:
    """Our tower config from HF's; ``stats``: the processor's image_mean/image_std, when known."""
    if hf.get("vision_use_head", True):
        # transformers builds the attention-pooling head unless the config turns it off.
        raise UnsupportedModelError(
            "siglip_vision_model with the pooling head (vision_use_head true or absent) is not supported; "
            "LLaVA-OneVision's towers set vision_use_head: false"
        )
    # SigLIP's config.json fields are CLIP's (its config class adds only defaults).
    return SiglipVisionConfig(**{name: hf.get(name, _HF_DEFAULTS[name]) for name in CLIP_FIELDS}, **stats)


def siglip_to_hf(cfg: SiglipVisionConfig) -> dict:
    return tower_to_hf(cfg, "siglip_vision_model", "SiglipVisionModel", vision_use_head=False)


SPEC = BackboneSpec(
    "siglip_vision_model",
    SiglipVisionConfig,
    SiglipVisionModel,
    siglip_from_hf,
    siglip_to_hf,
    # transformers 5.6+ flattens SiglipVisionModel and drops the `vision_model.` prefix, as for CLIP.
    key_layouts=((), (("vision_model.", ""),)),
    vision_targets=attention_targets(""),
)
