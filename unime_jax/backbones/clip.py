"""The CLIP vision tower (``clip_vision_model``): HF config mapping, key layouts, LoRA names.

A backbone of its own for conversion and parity checks, and the tower inside LLaVA-NeXT and
Phi-3.5-V, which reuse its config mapping and its attention names.
"""

from __future__ import annotations

from dataclasses import fields

from unime_jax.backbones.spec import BackboneSpec
from unime_jax.models.clip import CLIPVisionConfig, CLIPVisionModel

__all__ = ["CLIP_FIELDS", "SPEC", "attention_targets", "clip_from_hf", "clip_to_hf", "tower_to_hf"]

# config.json's fields: not the run-time choices, nor the normalisation statistics, which HF keeps in
# preprocessor_config.json. SigLIP's config has the same fields.
_NOT_IN_CONFIG_JSON = ("dtype", "param_dtype", "attention", "image_mean", "image_std")
CLIP_FIELDS = [f.name for f in fields(CLIPVisionConfig) if f.name not in _NOT_IN_CONFIG_JSON]


def clip_from_hf(hf: dict) -> CLIPVisionConfig:
    defaults = CLIPVisionConfig()
    return CLIPVisionConfig(**{name: hf.get(name, getattr(defaults, name)) for name in CLIP_FIELDS})


def tower_to_hf(cfg: CLIPVisionConfig, model_type: str, architecture: str, **extra: object) -> dict:
    """config.json of a tower whose config has CLIP's fields (CLIP's, SigLIP's), plus ``extra``."""
    hf = {name: getattr(cfg, name) for name in CLIP_FIELDS}
    hf.update(model_type=model_type, architectures=[architecture], torch_dtype=cfg.param_dtype, **extra)
    return hf


def clip_to_hf(cfg: CLIPVisionConfig) -> dict:
    return tower_to_hf(cfg, "clip_vision_model", "CLIPVisionModel")


def attention_targets(tower: str) -> str:
    """Regex of the tower's attention projections, the tower at module path regex ``tower``.

    VLM2Vec's name list (q/k/v/out_proj) reaches exactly these; it does not name fc1/fc2.
    """
    return rf"{tower}vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"


SPEC = BackboneSpec(
    "clip_vision_model",
    CLIPVisionConfig,
    CLIPVisionModel,
    clip_from_hf,
    clip_to_hf,
    # transformers 5 flattens CLIPVisionModel and drops the `vision_model.` prefix.
    key_layouts=((), (("vision_model.", ""),)),
    vision_targets=attention_targets(""),
)
