"""The SigLIP vision tower (``siglip_vision_model``): HF config mapping, key layouts, LoRA names.

A backbone of its own for conversion and parity checks, and the tower inside LLaVA-OneVision, which
reuses its config mapping. Its encoder layers are CLIP's, so CLIP's attention names serve LoRA.
"""

from __future__ import annotations

from dataclasses import fields

from unime_jax.backbones.clip import attention_targets
from unime_jax.backbones.spec import BackboneSpec, UnsupportedModelError
from unime_jax.models.siglip import SiglipVisionConfig, SiglipVisionModel

__all__ = ["SIGLIP_FIELDS", "SPEC", "siglip_from_hf", "siglip_to_hf"]

# config.json's fields: not the run-time choices, nor the normalisation statistics, which HF keeps in
# preprocessor_config.json.
_NOT_IN_CONFIG_JSON = ("dtype", "param_dtype", "attention", "image_mean", "image_std")
SIGLIP_FIELDS = [f.name for f in fields(SiglipVisionConfig) if f.name not in _NOT_IN_CONFIG_JSON]
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
    return SiglipVisionConfig(**{name: hf.get(name, _HF_DEFAULTS[name]) for name in SIGLIP_FIELDS}, **stats)


def siglip_to_hf(cfg: SiglipVisionConfig) -> dict:
    hf = {name: getattr(cfg, name) for name in SIGLIP_FIELDS}
    hf.update(
        model_type="siglip_vision_model",
        architectures=["SiglipVisionModel"],
        vision_use_head=False,
        torch_dtype=cfg.param_dtype,
    )
    return hf


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
