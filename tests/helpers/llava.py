"""A tiny random LLaVA-NeXT saved as an HF directory, and transformers' own model and processor on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from helpers import hf_models
from helpers.tiny_configs import PINPOINTS, TILE
from helpers.tokenizers import IMAGE_TOKEN, llava_tokenizer

TOL = 1e-4
SIZES = [(30, 40), (28, 28), (90, 20), (61, 57)]  # (height, width): 2×2 grid, 1×2, 3×1, 2×2 uncut


def write_tiny_llava(out: Path, seed: int = 0) -> Path:
    """A random tiny LLaVA-NeXT (Mistral LM with llava-hf's vocab) saved with its processor and tokenizer."""
    hf_models.llava_next(
        out,
        seed,
        image_size=TILE,
        pinpoints=PINPOINTS,
        image_token_index=IMAGE_TOKEN,
        vocab_size=32064,
        text_hidden=32,
        vision_layers=2,
        max_positions=512,
    )
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=[list(p) for p in PINPOINTS],
    )
    transformers.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=llava_tokenizer(),
        patch_size=7,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(out)
    return out


def random_image(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


class Reference:
    """transformers' LlavaNextForConditionalGeneration fed by its own LlavaNextProcessor."""

    def __init__(self, path: Path) -> None:
        self.model = transformers.LlavaNextForConditionalGeneration.from_pretrained(
            path, attn_implementation="eager"
        ).eval()
        self.processor = transformers.LlavaNextProcessor.from_pretrained(path)

    def embed(self, prompt: str, image: Image.Image | None = None) -> np.ndarray:
        """Final-norm hidden state of the last token, L2-normalised (UniME's embedding)."""
        inputs = self.processor(text=prompt, images=image, return_tensors="pt")
        with torch.no_grad():
            hidden = self.model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
        return torch.nn.functional.normalize(hidden, dim=-1).numpy()
