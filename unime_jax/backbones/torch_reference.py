"""What a backbone's transformers reference shares: the function type and the last token's state.

Each multimodal backbone's ``reference.py`` loads transformers' own model for an HF directory and
runs it on the ids and image arrays our featurizer makes (``BackboneSpec.reference``), so that
``python -m convert verify`` compares the two models on identical inputs. torch and transformers
are imported only when a reference is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from unime_jax.processing.featurizer import Arrays

__all__ = ["ReferenceFn", "last_token_state"]

# (token ids, the image's arrays from `BackboneInputs.process` or None) -> final-norm hidden state
# of the last token, float32 (UniME's embedding before normalisation).
ReferenceFn = Callable[[list[int], Arrays | None], np.ndarray]


def last_token_state(model: Any, **inputs: Any) -> np.ndarray:
    """``model``'s final-norm hidden state of the last token of a one-row batch, as float32 numpy."""
    import torch

    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][0, -1].float().numpy()
