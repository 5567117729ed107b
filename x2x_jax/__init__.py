"""x2x-jax: JAX/Flax InstructX2X — region-specific, explainable chest X-ray editing by instruction."""

__version__ = "0.1.0"
