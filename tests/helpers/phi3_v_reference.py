"""VLM2Vec's PyTorch Phi-3.5-V (vlm2vec-for-pyserini), at the CLIP-L/14-336 geometry it hard-codes,
with a shallow, narrow tower and LM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from vlm2vec_for_pyserini.model.baseline_backbone.phi3_v import image_embedding_phi3_v
from vlm2vec_for_pyserini.model.baseline_backbone.phi3_v.configuration_phi3_v import (
    Phi3VConfig as RefConfig,
)
from vlm2vec_for_pyserini.model.baseline_backbone.phi3_v.modeling_phi3_v import (
    Phi3VForCausalLM as RefModel,
)

__all__ = [
    "BOS",
    "CLIP_OVERRIDES",
    "PAD",
    "VOCAB",
    "RefConfig",
    "RefModel",
    "reference_clip",
    "reference_config",
    "write_reference",
]

VOCAB, PAD, BOS = 500, 0, 1
# Only these CLIP fields are free in the reference; they go into config.json as our
# `img_processor.vision_config` so that conversion builds the same tower.
CLIP_OVERRIDES = {"num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 4}


def reference_config() -> RefConfig:
    head_dim = 16
    gen = torch.Generator().manual_seed(1)
    return RefConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={
            "type": "su",
            "short_factor": (1.0 + torch.rand(head_dim // 2, generator=gen)).tolist(),
            "long_factor": (1.0 + 4 * torch.rand(head_dim // 2, generator=gen)).tolist(),
        },
        sliding_window=262144,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=2,
        embd_layer={
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        img_processor={
            "image_dim_out": 1024,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
            "vision_config": CLIP_OVERRIDES,
        },
        _attn_implementation="eager",
    )


def write_reference(out: Path, *, vocab_size: int = VOCAB, seed: int = 0) -> RefModel:
    """A random reference model saved to `out` as save_pretrained writes it (run under `reference_clip`).

    HF initialises the separators to zero; random ones make a misplaced separator visible.
    """
    cfg = reference_config()
    cfg.vocab_size = vocab_size
    torch.manual_seed(seed)
    ref = RefModel(cfg).eval()
    embedding = ref.model.vision_embed_tokens
    with torch.no_grad():
        embedding.glb_GN.normal_()
        embedding.sub_GN.normal_()
    # `wte` is embed_tokens itself; safetensors refuses aliases unless one is declared tied.
    embedding._dynamic_tied_weights_keys = ["wte.weight"]
    ref.save_pretrained(out, safe_serialization=True)
    return ref


@pytest.fixture(scope="module")
def reference_clip():
    """Makes the reference build a shallow CLIP-L/14-336 while the module's tests run.

    `Phi3ImageEmbedding` reads the module constant `CLIP_VIT_LARGE_PATCH14_336_CONFIG`; it is swapped
    for a copy with CLIP_OVERRIDES. The reference's code and math are untouched.
    """
    full = image_embedding_phi3_v.CLIP_VIT_LARGE_PATCH14_336_CONFIG
    tiny = transformers.CLIPVisionConfig(**{**full.to_dict(), **CLIP_OVERRIDES})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(image_embedding_phi3_v, "CLIP_VIT_LARGE_PATCH14_336_CONFIG", tiny)
        yield
