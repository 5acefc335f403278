"""HF safetensors <-> unime-jax models: the conversion logic behind ``python -m convert``.

- ``mapping``: our parameter names <-> HF tensor names (a rename table per backbone plus transposes);
- ``safetensors_io``: streaming reads of (sharded) safetensors, sharded writes, in-memory sources;
- ``to_jax``: an HF directory (or state dict) straight onto the mesh, and ``convert_hf_dir``;
- ``to_hf``: a model back to an HF directory; ``peft``: a LoRA model's adapters as a PEFT adapter.

The library imports these modules; the top-level ``convert`` package is only the CLI over them.
"""

from unime_jax.conversion.mapping import ConversionError
from unime_jax.conversion.to_hf import export_checkpoint, export_hf
from unime_jax.conversion.to_jax import convert_hf_dir, load_hf_model

__all__ = ["ConversionError", "convert_hf_dir", "export_checkpoint", "export_hf", "load_hf_model"]
