"""InstructX2X v2: the paper's recipe on MIMIC-EDIT-INSTRUCTION v2 (instructions with location and severity).

Defined in x2x_jax/configs/ix2x_v2.py; this file lets `--config configs/ix2x_v2.py` name it.
"""

from x2x_jax.configs.ix2x_v2 import get_config  # noqa: F401
