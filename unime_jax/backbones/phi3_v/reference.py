"""VLM2Vec's PyTorch Phi-3.5-V on our featurized inputs (the verify reference).

Phi-3.5-V has no transformers class of its own. The reference is VLM2Vec's copy of the model code
(pip ``vlm2vec-for-pyserini``, installed with ``--no-deps``; it imports on transformers 4.x, not
5), which the parity tests use too; without it, the directory's own remote code (``auto_map``)
is loaded with ``trust_remote_code``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from unime_jax.backbones.torch_reference import ReferenceFn, last_token_state
from unime_jax.models.phi3_v import Phi3VConfig
from unime_jax.processing.featurizer import Arrays

__all__ = ["reference_model"]


def _model_class(hf_dir: Path):
    try:
        from vlm2vec_for_pyserini.model.baseline_backbone.phi3_v.modeling_phi3_v import Phi3VForCausalLM
    except ImportError:
        if "auto_map" not in json.loads((hf_dir / "config.json").read_text()):
            raise ValueError(
                f"no PyTorch Phi-3.5-V to compare with: {hf_dir}/config.json has no auto_map (remote code) "
                "and vlm2vec-for-pyserini is not installed (pip install --no-deps vlm2vec-for-pyserini, "
                "with transformers 4.x)"
            ) from None
        import transformers

        return lambda path, **kw: transformers.AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=True, **kw
        )
    return Phi3VForCausalLM.from_pretrained


def reference_model(hf_dir: Path, cfg: Phi3VConfig, dtype: str) -> ReferenceFn:
    import torch

    torch_dtype = getattr(torch, dtype)
    model = _model_class(hf_dir)(hf_dir, torch_dtype=torch_dtype, attn_implementation="eager").eval()

    def run(ids: list[int], image: Arrays | None) -> np.ndarray:
        # VLM2Vec's forward takes per-row lists of pixels and sizes; None for a text-only row.
        pixels, sizes = [None], [None]
        if image is not None:
            pixels = [torch.tensor(image["pixel_values"][None]).to(torch_dtype)]
            sizes = [torch.tensor(image["image_sizes"][None].astype(np.int64))]
        ids_t = torch.tensor([ids])
        return last_token_state(
            model,
            input_ids=ids_t,
            attention_mask=torch.ones_like(ids_t),
            pixel_values=pixels,
            image_sizes=sizes,
        )

    return run
