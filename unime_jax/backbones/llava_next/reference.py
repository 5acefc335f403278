"""transformers' anyres model on our featurized inputs (the verify reference): LLaVA-NeXT's
``LlavaNextForConditionalGeneration`` and, with OneVision's class and inputs, LLaVA-OneVision's.

The anyres tiles travel as uint8 (the tower normalises them on the device); transformers takes
them normalised, so the real tiles are normalised here with the config's statistics, exactly as
its image processor would have.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from unime_jax.backbones.llava_next.inputs import LlavaNextInputs
from unime_jax.backbones.torch_reference import ReferenceFn, last_token_state
from unime_jax.models.clip import normalize_pixels
from unime_jax.models.llava_next import LlavaNextConfig
from unime_jax.processing.featurizer import Arrays

__all__ = ["anyres_reference", "reference_model"]

ReferenceLoader = Callable[[Path, LlavaNextConfig, str], ReferenceFn]


def anyres_reference(
    model_class: str, inputs_cls: Callable[[LlavaNextConfig], LlavaNextInputs] = LlavaNextInputs
) -> ReferenceLoader:
    """The ``BackboneSpec.reference`` for transformers' ``model_class`` (a name in ``transformers``),
    whose inputs are LLaVA-NeXT's: the real tiles, normalised, and the original size."""

    def load(hf_dir: Path, cfg: LlavaNextConfig, dtype: str) -> ReferenceFn:
        import torch
        import transformers

        torch_dtype = getattr(torch, dtype)
        model = getattr(transformers, model_class).from_pretrained(hf_dir, torch_dtype=torch_dtype)
        model.eval()
        inputs = inputs_cls(cfg)

        def run(ids: list[int], image: Arrays | None) -> np.ndarray:
            kwargs = {"input_ids": torch.tensor([ids])}
            if image is not None:
                tiles = image["pixel_values"][: inputs.num_tiles(image)]
                pixels = normalize_pixels(tiles, cfg.vision.image_mean, cfg.vision.image_std)
                kwargs["pixel_values"] = torch.tensor(pixels[None]).to(torch_dtype)
                kwargs["image_sizes"] = torch.tensor(image["image_sizes"][None].astype(np.int64))
            return last_token_state(model, **kwargs)

        return run

    return load


reference_model = anyres_reference("LlavaNextForConditionalGeneration")
