"""TFDS builders of the project; importing this package registers them with TFDS.

    tfds build synth_cxr_edit --imports x2x_jax.data.tfds --config v1 --data_dir DIR
    tfds build mimic_edit_instruction --imports x2x_jax.data.tfds --config v1 --manual_dir RELEASE --data_dir DIR

Both write ArrayRecord files, read back without TensorFlow by `tfds.data_source(name, split=..., data_dir=DIR)`
(see `x2x_jax.data.pipeline`).
"""

from x2x_jax.data.tfds.mimic_edit_instruction import MimicEditInstruction, MimicEditInstructionConfig
from x2x_jax.data.tfds.synth_cxr_edit import SynthCxrEdit, SynthCxrEditConfig

__all__ = ["MimicEditInstruction", "MimicEditInstructionConfig", "SynthCxrEdit", "SynthCxrEditConfig"]
