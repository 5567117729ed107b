"""InstructX2X v1: the paper's recipe on MIMIC-EDIT-INSTRUCTION v1.

Defined in x2x_jax/configs/ix2x_v1.py; this file lets `--config configs/ix2x_v1.py` name it.
"""

from x2x_jax.configs.ix2x_v1 import get_config  # noqa: F401
