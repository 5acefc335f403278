"""Tiny random HF models written with `save_pretrained`: the numerical references for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 512


def _save(model: torch.nn.Module, out: Path, **kwargs) -> Path:
    model.eval()
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    return out


def llama(out: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        attention_bias=True,
        rms_norm_eps=1e-6,
        **overrides,
    )
    return _save(transformers.LlamaForCausalLM(cfg), out)


def mistral(out: Path, seed: int = 0, **kwargs) -> Path:
    """GQA (4 query heads over 2 K/V heads) and a sliding window shorter than the test sequences."""
    torch.manual_seed(seed)
    cfg = transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=5,
        max_position_embeddings=256,
    )
    return _save(transformers.MistralForCausalLM(cfg), out, **kwargs)


PHI3_ORIGINAL_MAX = 32


def phi3(out: Path, seed: int = 0) -> Path:
    """Phi-3 with fused projections and longrope: sequences > 32 tokens switch to the long factors."""
    torch.manual_seed(seed)
    head_dim = 16
    gen = torch.Generator().manual_seed(seed + 1)
    short = (1.0 + torch.rand(head_dim // 2, generator=gen)).tolist()
    long = (1.0 + 4 * torch.rand(head_dim // 2, generator=gen)).tolist()
    cfg = transformers.Phi3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4 * PHI3_ORIGINAL_MAX,
        original_max_position_embeddings=PHI3_ORIGINAL_MAX,
        rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long},
        sliding_window=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save(transformers.Phi3ForCausalLM(cfg), out)


def clip_vision(out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    return _save(transformers.CLIPVisionModel(cfg), out)


def llava_next(
    out: Path,
    seed: int = 0,
    *,
    image_size: int,
    pinpoints: list,
    image_token_index: int,
    vocab_size: int = VOCAB,
    text_hidden: int = 64,
    vision_layers: int = 3,
    max_positions: int = 256,
) -> Path:
    """LLaVA-NeXT: a CLIP tower with 7-px patches and a GQA Mistral LM without a sliding window."""
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=7,
    )
    text = transformers.MistralConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=None,
        max_position_embeddings=max_positions,
    )
    cfg = transformers.LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_index,
        image_grid_pinpoints=[list(p) for p in pinpoints],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return _save(transformers.LlavaNextForConditionalGeneration(cfg), out)


def load_torch(path: Path) -> torch.nn.Module:
    model = transformers.AutoModel.from_pretrained(path) if "clip" in path.name else None
    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    return model.eval()
