"""Input processing for the backbones (numpy/PIL only, no torch or jax): image processors, prompts
and token ids, and the featurizers that combine them."""

from unime_jax.processing.featurizer import (
    BackboneFeaturizer,
    LlavaNextInputs,
    Phi3VInputs,
    TextOnlyInputs,
    backbone_inputs,
)
from unime_jax.processing.images import ImageBatch, ProcessedImage, collate, process_batch
from unime_jax.processing.images_llava import LlavaNextImageProcessor, LlavaProcessedImage
from unime_jax.processing.images_phi3v import Phi3VImageProcessor
from unime_jax.processing.prompts import TEMPLATES, PromptFormat, llava_next_ids, phi3_v_ids

__all__ = [
    "TEMPLATES",
    "BackboneFeaturizer",
    "ImageBatch",
    "LlavaNextImageProcessor",
    "LlavaNextInputs",
    "LlavaProcessedImage",
    "Phi3VImageProcessor",
    "Phi3VInputs",
    "ProcessedImage",
    "PromptFormat",
    "TextOnlyInputs",
    "backbone_inputs",
    "collate",
    "llava_next_ids",
    "phi3_v_ids",
    "process_batch",
]
