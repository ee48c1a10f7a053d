"""pacs_jax: PACS post-training for LLMs in JAX / Flax NNX."""

__version__ = "0.1.0"
