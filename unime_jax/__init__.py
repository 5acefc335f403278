"""unime-jax: UniME universal multimodal embeddings (Phi-3.5-V, LLaVA-1.6) in JAX/Flax NNX."""

__version__ = "0.1.0"
