"""LLaVA-NeXT's HF config.json mapping and the tensor-name layouts transformers 4 and 5 use."""

from __future__ import annotations

import copy

from unime_jax.backbones.clip import clip_from_hf, clip_to_hf
from unime_jax.backbones.decoder_hf import decoder_from_hf, decoder_to_hf
from unime_jax.backbones.spec import UnsupportedModelError
from unime_jax.models.llava_next import LlavaNextConfig

__all__ = ["KEY_LAYOUTS", "llava_next_from_hf", "llava_next_to_hf", "with_hf_defaults"]


def with_hf_defaults(hf: dict) -> dict:
    """config.json completed with the defaults transformers fills in when it loads it.

    Hub LLaVA-NeXT (and OneVision) configs store sub-configs as differences from defaults (llava-hf's Mistral
    text_config has no hidden_size or num_hidden_layers), so they are read through transformers'
    own config classes, in whichever major version is installed.
    """
    import transformers  # only composite configs need it; it is slow to import

    kwargs = copy.deepcopy({k: v for k, v in hf.items() if k != "model_type"})
    return transformers.AutoConfig.for_model(hf["model_type"], **kwargs).to_dict()


def llava_next_from_hf(hf: dict) -> LlavaNextConfig:
    full = with_hf_defaults(hf)
    text, vision = full["text_config"], full["vision_config"]
    if text["model_type"] not in ("llama", "mistral"):
        raise UnsupportedModelError(
            f"llava_next text_config model_type {text['model_type']!r} is not supported (llama, mistral)"
        )
    if vision["model_type"] != "clip_vision_model":
        raise UnsupportedModelError(
            f"llava_next vision_config model_type {vision['model_type']!r} is not supported (clip_vision_model)"
        )
    if not isinstance(full["vision_feature_layer"], int):
        raise UnsupportedModelError("llava_next with several vision_feature_layer indices is not supported")
    if full["vision_feature_select_strategy"] != "default":
        # "full" keeps CLS, so a tile's features no longer form the square map anyres packing needs.
        raise UnsupportedModelError("llava_next vision_feature_select_strategy must be 'default'")
    return LlavaNextConfig(
        text=decoder_from_hf(text),
        vision=clip_from_hf(vision),
        image_token_index=int(full["image_token_index"]),
        image_grid_pinpoints=tuple((int(h), int(w)) for h, w in full["image_grid_pinpoints"]),
        vision_feature_layer=full["vision_feature_layer"],
        projector_hidden_act=full["projector_hidden_act"],
        multimodal_projector_bias=bool(full.get("multimodal_projector_bias", True)),
    )


def llava_next_to_hf(cfg: LlavaNextConfig) -> dict:
    return {
        "model_type": "llava_next",
        "architectures": ["LlavaNextForConditionalGeneration"],
        "text_config": decoder_to_hf(cfg.text),
        "vision_config": clip_to_hf(cfg.vision),
        "image_token_index": cfg.image_token_index,
        "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "projector_hidden_act": cfg.projector_hidden_act,
        "multimodal_projector_bias": cfg.multimodal_projector_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": cfg.param_dtype,
    }


# Prefix renames of LLaVA-NeXT tensor names (ours = the hub layout that transformers 4 saves).
_LLAVA_NEXT_IN_MEMORY = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)
KEY_LAYOUTS = (
    (),
    # transformers 5 save_pretrained: CLIP flattened (no `vision_model.`), the rest as on the hub.
    (("vision_tower.vision_model.", "vision_tower."),),
    # transformers 5 state_dict (and its checkpoint conversion targets).
    (*_LLAVA_NEXT_IN_MEMORY, ("vision_tower.vision_model.", "model.vision_tower.")),
    # transformers 4.5x state_dict.
    (*_LLAVA_NEXT_IN_MEMORY, ("vision_tower.", "model.vision_tower.")),
)
