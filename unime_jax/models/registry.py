"""HF `model_type` -> our config and module, and config.json translation both ways.

transformers 4.x writes `rope_theta`/`rope_scaling`; 5.x writes `rope_parameters`. Both are read.
Export writes the 4.x layout, which both major versions load.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from flax import nnx

from unime_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
from unime_jax.models.decoder import DecoderConfig, DecoderLM
from unime_jax.models.llava_next import LlavaNext, LlavaNextConfig
from unime_jax.models.phi3_v import Phi3VConfig, Phi3VForCausalLM
from unime_jax.models.rope import RopeScaling


class UnsupportedModelError(ValueError):
    """The HF config names a model type or option this port does not implement."""


def _rope_fields(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling dict or None) from either the v4 or the v5 config layout."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        return float(theta), None if kind == "default" else params
    return float(hf.get("rope_theta", 10000.0)), hf.get("rope_scaling")


def _rope_scaling(hf: dict, scaling: dict | None) -> RopeScaling | None:
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("longrope", "su"):
        raise UnsupportedModelError(
            f"rope scaling type {kind!r} is not supported (only default and longrope/su)"
        )
    original = scaling.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if original is None:
        original = hf["max_position_embeddings"]
    return RopeScaling(
        short_factor=tuple(float(f) for f in scaling["short_factor"]),
        long_factor=tuple(float(f) for f in scaling["long_factor"]),
        original_max_position_embeddings=int(original),
        attention_factor=scaling.get("attention_factor"),
    )


def decoder_from_hf(hf: dict) -> DecoderConfig:
    family = hf["model_type"]
    heads = hf["num_attention_heads"]
    theta, scaling = _rope_fields(hf)
    window = hf.get("sliding_window") if family in ("mistral", "phi3") else None
    return DecoderConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=_rope_scaling(hf, scaling),
        partial_rotary_factor=float(hf.get("partial_rotary_factor", 1.0)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        sliding_window=window,
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        hidden_act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM"}


def decoder_to_hf(cfg: DecoderConfig) -> dict:
    hf: dict[str, Any] = {
        "model_type": cfg.family,
        "architectures": [_ARCHITECTURES[cfg.family]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.family == "llama":
        hf.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    if cfg.family in ("mistral", "phi3"):
        hf["sliding_window"] = cfg.sliding_window
    if cfg.family == "phi3":
        hf["partial_rotary_factor"] = cfg.partial_rotary_factor
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        hf["original_max_position_embeddings"] = s.original_max_position_embeddings
        hf["rope_scaling"] = {
            "type": "longrope",
            "short_factor": list(s.short_factor),
            "long_factor": list(s.long_factor),
        }
        if s.attention_factor is not None:
            hf["rope_scaling"]["attention_factor"] = s.attention_factor
    return hf


_CLIP_FIELDS = [
    f.name for f in fields(CLIPVisionConfig) if f.name not in ("dtype", "param_dtype", "attention")
]


def clip_from_hf(hf: dict) -> CLIPVisionConfig:
    defaults = CLIPVisionConfig()
    return CLIPVisionConfig(**{name: hf.get(name, getattr(defaults, name)) for name in _CLIP_FIELDS})


def clip_to_hf(cfg: CLIPVisionConfig) -> dict:
    hf = {name: getattr(cfg, name) for name in _CLIP_FIELDS}
    hf.update(model_type="clip_vision_model", architectures=["CLIPVisionModel"], torch_dtype=cfg.param_dtype)
    return hf


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
        num_crops=int(hf.get("num_crops", 4)),  # from preprocessor_config.json (conversion.to_jax)
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
        n: getattr(cfg.vision, n) for n in _CLIP_FIELDS if getattr(cfg.vision, n) != getattr(clip_l, n)
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


def _with_hf_defaults(hf: dict) -> dict:
    """config.json completed with the defaults transformers fills in when it loads it.

    Hub LLaVA-NeXT configs store sub-configs as differences from defaults (llava-hf's Mistral
    text_config has no hidden_size or num_hidden_layers), so they are read through transformers'
    own config classes, in whichever major version is installed.
    """
    import transformers  # only composite configs need it; it is slow to import

    kwargs = copy.deepcopy({k: v for k, v in hf.items() if k != "model_type"})
    return transformers.AutoConfig.for_model(hf["model_type"], **kwargs).to_dict()


def llava_next_from_hf(hf: dict) -> LlavaNextConfig:
    full = _with_hf_defaults(hf)
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
_LLAVA_NEXT_LAYOUTS = (
    (),
    # transformers 5 save_pretrained: CLIP flattened (no `vision_model.`), the rest as on the hub.
    (("vision_tower.vision_model.", "vision_tower."),),
    # transformers 5 state_dict (and its checkpoint conversion targets).
    (*_LLAVA_NEXT_IN_MEMORY, ("vision_tower.vision_model.", "model.vision_tower.")),
    # transformers 4.5x state_dict.
    (*_LLAVA_NEXT_IN_MEMORY, ("vision_tower.", "model.vision_tower.")),
)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build, convert and export one HF model type."""

    model_type: str  # HF config.json `model_type`
    config_cls: type  # our architecture dataclass
    module_cls: type[nnx.Module]  # our NNX module, whose tree mirrors HF's
    from_hf: Callable[[dict], Any]  # HF config.json dict -> our config
    to_hf: Callable[[Any], dict]  # our config -> HF config.json dict
    # Alternative (our prefix, HF prefix) renames; the first is what export writes.
    key_layouts: tuple[tuple[tuple[str, str], ...], ...] = ((),)
    # Regexes of HF keys that duplicate another tensor (e.g. a tied alias): skipped on import.
    aliases: tuple[str, ...] = ()


_DECODER = {
    "config_cls": DecoderConfig,
    "module_cls": DecoderLM,
    "from_hf": decoder_from_hf,
    "to_hf": decoder_to_hf,
}

SPECS: dict[str, ModelSpec] = {
    "llama": ModelSpec("llama", **_DECODER),
    "mistral": ModelSpec("mistral", **_DECODER),
    "phi3": ModelSpec("phi3", **_DECODER),
    "clip_vision_model": ModelSpec(
        "clip_vision_model",
        CLIPVisionConfig,
        CLIPVisionModel,
        clip_from_hf,
        clip_to_hf,
        # transformers 5 flattens CLIPVisionModel and drops the `vision_model.` prefix.
        key_layouts=((), (("vision_model.", ""),)),
    ),
    "phi3_v": ModelSpec(
        "phi3_v",
        Phi3VConfig,
        Phi3VForCausalLM,
        phi3_v_from_hf,
        phi3_v_to_hf,
        # The image embedding's `wte` is embed_tokens itself; checkpoints that store it hold a copy.
        aliases=(r"^model\.vision_embed_tokens\.wte\.weight$",),
    ),
    "llava_next": ModelSpec(
        "llava_next",
        LlavaNextConfig,
        LlavaNext,
        llava_next_from_hf,
        llava_next_to_hf,
        key_layouts=_LLAVA_NEXT_LAYOUTS,
    ),
}


def spec_for(model_type: str) -> ModelSpec:
    if model_type not in SPECS:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; supported: {sorted(SPECS)}")
    return SPECS[model_type]


def with_runtime(cfg: Any, **changes: Any) -> Any:
    """Copy of an architecture config with run-time fields (dtype, attention, num_crops, ...) changed.

    A field the config does not have (e.g. ``num_crops`` for LLaVA-NeXT) is a ValueError naming it.
    """
    chosen = {k: v for k, v in changes.items() if v is not None}
    unknown = sorted(set(chosen) - {f.name for f in fields(cfg)})
    if unknown:
        raise ValueError(f"{type(cfg).__name__} has no setting {', '.join(unknown)}")
    return replace(cfg, **chosen)
