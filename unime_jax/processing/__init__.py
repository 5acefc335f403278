"""Input processing for the vision backbones (numpy/PIL only, no torch)."""

from unime_jax.processing.images import ImageBatch, ProcessedImage, collate, process_batch
from unime_jax.processing.images_llava import LlavaNextImageProcessor
from unime_jax.processing.images_phi3v import Phi3VImageProcessor

__all__ = [
    "ImageBatch",
    "LlavaNextImageProcessor",
    "Phi3VImageProcessor",
    "ProcessedImage",
    "collate",
    "process_batch",
]
