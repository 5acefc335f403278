"""Tiny architecture configs of the multimodal backbones, at a toy CLIP geometry."""

from __future__ import annotations

from helpers.tokenizers import IMAGE_TOKEN
from unime_jax.models.clip import CLIPVisionConfig
from unime_jax.models.decoder import DecoderConfig
from unime_jax.models.llava_next import LlavaNextConfig
from unime_jax.models.phi3_v import Phi3VConfig

TILE = 28  # tiny CLIP tiles: 7-pixel patches, so 4×4 features per LLaVA tile and 2×2 merged per Phi crop
PINPOINTS = ((28, 56), (56, 28), (56, 56), (84, 28), (28, 84))  # llava-hf's, scaled by 28/336
VISION = CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=TILE,
    patch_size=7,
)


def llava_config() -> LlavaNextConfig:
    text = DecoderConfig("mistral", 32064, 32, 64, 1, 4, 2, 8)
    return LlavaNextConfig(
        text=text, vision=VISION, image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS
    )


def phi3_v_config() -> Phi3VConfig:
    return Phi3VConfig(text=DecoderConfig("phi3", 32064, 32, 64, 1, 4, 4, 8), vision=VISION, num_crops=4)


# `model.init` of a tiny random Mistral for runs of the train CLI (with tokenizer: mistral-common).
MISTRAL_INIT = {
    "model_type": "mistral",
    "vocab_size": 32000,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
