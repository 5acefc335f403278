"""HF safetensors <-> unime-jax checkpoints: `python -m convert to-jax | to-hf`."""

from convert.mapping import ConversionError
from convert.to_hf import export_checkpoint, export_hf
from convert.to_jax import convert_hf_dir, load_hf_model

__all__ = ["ConversionError", "convert_hf_dir", "export_checkpoint", "export_hf", "load_hf_model"]
