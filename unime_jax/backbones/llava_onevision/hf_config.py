"""LLaVA-OneVision's HF config.json mapping, its processor's statistics, and its tensor-name layouts.

The module tree is LLaVA-NeXT's (``vision_tower``, ``multi_modal_projector``, ``image_newline``,
``language_model``), and transformers 4 and 5 rename it the same way, so the key layouts are
LLaVA-NeXT's; transformers 5.6+ flattens ``SiglipVisionModel`` as it flattens CLIP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unime_jax.backbones.decoder_hf import decoder_from_hf, decoder_to_hf
from unime_jax.backbones.llava_next.hf_config import KEY_LAYOUTS, llava_next_to_hf, with_hf_defaults
from unime_jax.backbones.siglip import siglip_from_hf, siglip_to_hf
from unime_jax.backbones.spec import UnsupportedModelError
from unime_jax.models.llava_onevision import LlavaOnevisionConfig

__all__ = ["KEY_LAYOUTS", "llava_onevision_from_hf", "llava_onevision_to_hf", "processor_settings"]

_STATS = ("image_mean", "image_std")


def llava_onevision_from_hf(hf: dict) -> LlavaOnevisionConfig:
    full = with_hf_defaults(hf)
    text, vision = full["text_config"], full["vision_config"]
    if text["model_type"] != "qwen2":
        raise UnsupportedModelError(
            f"llava_onevision text_config model_type {text['model_type']!r} is not supported (qwen2)"
        )
    if vision["model_type"] != "siglip_vision_model":
        raise UnsupportedModelError(
            f"llava_onevision vision_config model_type {vision['model_type']!r} is not supported "
            f"(siglip_vision_model)"
        )
    if not isinstance(full["vision_feature_layer"], int):
        raise UnsupportedModelError(
            "llava_onevision with several vision_feature_layer indices is not supported"
        )
    if full["vision_feature_select_strategy"] != "full":
        # "default" drops SigLIP's first patch (it has no CLS), which breaks the square tile map.
        raise UnsupportedModelError("llava_onevision vision_feature_select_strategy must be 'full'")
    stats = {k: tuple(float(v) for v in hf[k]) for k in _STATS if k in hf}
    return LlavaOnevisionConfig(
        text=decoder_from_hf(text),
        vision=siglip_from_hf(vision, **stats),
        image_token_index=int(full["image_token_index"]),
        image_grid_pinpoints=tuple((int(h), int(w)) for h, w in full["image_grid_pinpoints"]),
        vision_feature_layer=full["vision_feature_layer"],
        vision_aspect_ratio=full["vision_aspect_ratio"],
        projector_hidden_act=full["projector_hidden_act"],
        multimodal_projector_bias=bool(full.get("multimodal_projector_bias", True)),
    )


def llava_onevision_to_hf(cfg: LlavaOnevisionConfig) -> dict:
    hf = llava_next_to_hf(cfg)  # the shared fields; the towers and the type are OneVision's
    hf.update(
        model_type="llava_onevision",
        architectures=["LlavaOnevisionForConditionalGeneration"],
        text_config=decoder_to_hf(cfg.text),
        vision_config=siglip_to_hf(cfg.vision),
        vision_aspect_ratio=cfg.vision_aspect_ratio,
    )
    return hf


def processor_settings(hf_dir: Path) -> dict[str, Any]:
    """The processor's normalisation statistics (preprocessor_config.json), which the tower applies
    to uint8 pixels on the device; absent: SigLIP's 0.5, as llava-hf's OneVision processors have."""
    path = Path(hf_dir) / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
        return {k: [float(v) for v in settings[k]] for k in _STATS if k in settings}
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"cannot read image_mean/image_std from {path}: {e}") from e
