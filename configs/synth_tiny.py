"""synth_tiny: the embedded default — a tiny VAE + tiny IP2P UNet on the synthetic chest-radiograph edit set.

Defined in x2x_jax/configs/synth_tiny.py; this file lets `--config configs/synth_tiny.py` name it.
"""

from x2x_jax.configs.synth_tiny import get_config  # noqa: F401
