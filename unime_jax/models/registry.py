"""HF `model_type` -> our config and module, and config.json translation both ways.

transformers 4.x writes `rope_theta`/`rope_scaling`; 5.x writes `rope_parameters`. Both are read.
Export writes the 4.x layout, which both major versions load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from flax import nnx

from unime_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
from unime_jax.models.decoder import DecoderConfig, DecoderLM
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
}


def spec_for(model_type: str) -> ModelSpec:
    if model_type not in SPECS:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; supported: {sorted(SPECS)}")
    return SPECS[model_type]


def with_runtime(cfg: Any, **changes: Any) -> Any:
    """Copy of an architecture config with run-time fields (dtype, attention, ...) changed."""
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})
