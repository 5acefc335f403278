"""Phi-3.5-V's HF config.json mapping (remote code ``Phi3VConfig``) and its preprocessor settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unime_jax.backbones.clip import CLIP_FIELDS, clip_from_hf
from unime_jax.backbones.decoder_hf import decoder_from_hf, decoder_to_hf
from unime_jax.backbones.spec import UnsupportedModelError
from unime_jax.models.clip import CLIPVisionConfig
from unime_jax.models.phi3_v import Phi3VConfig

__all__ = ["phi3_v_from_hf", "phi3_v_to_hf", "processor_settings"]


# Phi-3-V is remote code: Phi-3 decoder fields plus `embd_layer` and `img_processor`. The remote code
# hard-codes a CLIP-L/14-336 tower; `img_processor.vision_config` (ours, ignored by the remote code)
# lists the fields that differ from it, so tiny test models can describe their tower.
_PHI3_V_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}
_PHI3_V_CLIP = {"name": "clip_vision_model", "model_name": "openai/clip-vit-large-patch14-336"}


def phi3_v_from_hf(hf: dict) -> Phi3VConfig:
    embd, img = hf.get("embd_layer") or {}, hf.get("img_processor") or {}
    if any(embd.get(k) != v for k, v in _PHI3_V_EMBD_LAYER.items()):
        raise UnsupportedModelError(
            f"phi3_v embd_layer {embd} is not supported; expected {_PHI3_V_EMBD_LAYER}"
        )
    if any(img.get(k) != v for k, v in _PHI3_V_CLIP.items()) or img.get("type_feature", "patch") != "patch":
        raise UnsupportedModelError(f"phi3_v img_processor {img} is not supported; expected {_PHI3_V_CLIP}")
    cfg = Phi3VConfig(
        text=decoder_from_hf({**hf, "model_type": "phi3"}),
        vision=clip_from_hf(img.get("vision_config", {})),
        feature_layer=int(img.get("layer_idx", -2)),
        num_crops=int(hf.get("num_crops", 4)),  # from preprocessor_config.json (processor_settings)
    )
    derived = {"image_dim_out": cfg.vision.hidden_size, "num_img_tokens": cfg.merged_side**2}
    if any(img.get(k, v) != v for k, v in derived.items()):
        raise UnsupportedModelError(f"phi3_v img_processor {img} disagrees with its CLIP tower {derived}")
    return cfg


def phi3_v_to_hf(cfg: Phi3VConfig) -> dict:
    hf = decoder_to_hf(cfg.text)
    if "rope_scaling" in hf:
        if "attention_factor" in hf["rope_scaling"]:
            raise UnsupportedModelError("phi3_v rope scaling cannot carry an explicit attention_factor")
        hf["rope_scaling"]["type"] = "su"  # the remote Phi3VConfig accepts only su and yarn
    img: dict[str, Any] = {
        **_PHI3_V_CLIP,
        "image_dim_out": cfg.vision.hidden_size,
        "num_img_tokens": cfg.merged_side**2,
    }
    if cfg.feature_layer != -2:
        img["layer_idx"] = cfg.feature_layer
    clip_l = CLIPVisionConfig()
    changed = {
        n: getattr(cfg.vision, n) for n in CLIP_FIELDS if getattr(cfg.vision, n) != getattr(clip_l, n)
    }
    if changed:
        img["vision_config"] = changed
    hf.update(
        model_type="phi3_v",
        architectures=["Phi3VForCausalLM"],
        embd_layer=dict(_PHI3_V_EMBD_LAYER),
        img_processor=img,
    )
    return hf


def processor_settings(hf_dir: Path) -> dict[str, Any]:
    """The crop budget, which fixes the model's static shapes, as a config field.

    Phi-3.5-V's ``num_crops`` lives in preprocessor_config.json, not config.json, and sets the
    padded image-feature length.
    """
    path = Path(hf_dir) / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        crops = json.loads(path.read_text()).get("num_crops")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"cannot read num_crops from {path}: {e}") from e
    return {} if crops is None else {"num_crops": int(crops)}
