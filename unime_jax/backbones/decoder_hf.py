"""The decoder families (Llama, Mistral, Phi-3, Qwen2): HF config.json mapping and LoRA module names.

Shared by the text-only backbones and by the language models inside LLaVA-NeXT, Phi-3.5-V and
LLaVA-OneVision.
transformers 4.x writes ``rope_theta``/``rope_scaling``; 5.x writes ``rope_parameters``. Both are
read; export writes the 4.x layout, which both major versions load.
"""

from __future__ import annotations

import re
from typing import Any

from unime_jax.backbones.spec import UnsupportedModelError
from unime_jax.models.decoder import DecoderConfig
from unime_jax.models.rope import RopeScaling

__all__ = ["FAMILIES", "decoder_from_hf", "decoder_to_hf", "lm_targets"]

FAMILIES = ("llama", "mistral", "phi3", "qwen2")


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
    if family == "qwen2" and hf.get("use_sliding_window"):
        # Qwen2 windows only the layers from max_window_layers on; the one decoder windows all or none.
        raise UnsupportedModelError("qwen2 with use_sliding_window=true is not supported")
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
        qkv_bias=family == "qwen2",  # Qwen2's q/k/v always carry biases (its config has no switch)
        mlp_bias=bool(hf.get("mlp_bias", False)),
        hidden_act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


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
    if cfg.family == "qwen2":
        hf["use_sliding_window"] = False
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


# The attention and MLP projections of each family: Phi-3 keeps HF's fused kernels, Llama/Mistral
# separate ones. These are E5-V's stage-1 targets and the LM part of VLM2Vec's stage-2 list.
_SEPARATE = r"self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj)"
_PROJECTIONS = {
    "phi3": r"self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj)",
    "llama": _SEPARATE,
    "mistral": _SEPARATE,
    "qwen2": _SEPARATE,
}


def lm_targets(family: str, prefix: str = "") -> str:
    """Regex of a decoder family's attention and MLP projections, under the module path ``prefix``."""
    if family not in _PROJECTIONS:
        raise ValueError(f"no LoRA targets for decoder family {family!r}; known: {sorted(_PROJECTIONS)}")
    return rf"{re.escape(prefix)}model\.layers\.\d+\.({_PROJECTIONS[family]})"
