"""Training configs: see x2x_jax/configs/ (these files let `--config configs/NAME.py` name them from a checkout)."""
