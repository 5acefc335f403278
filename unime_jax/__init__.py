"""unime-jax: UniME universal multimodal embeddings (Phi-3.5-V, LLaVA-1.6) in JAX/Flax NNX."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["UniME"]

if TYPE_CHECKING:
    from unime_jax.embedder import UniME


def __getattr__(name: str) -> Any:
    # Lazy: `import unime_jax.processing` (data workers, CLIs) must not pay for importing jax.
    if name == "UniME":
        from unime_jax.embedder import UniME

        return UniME
    raise AttributeError(f"module 'unime_jax' has no attribute {name!r}")
