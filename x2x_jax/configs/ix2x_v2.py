"""InstructX2X v2: the paper's recipe on MIMIC-EDIT-INSTRUCTION v2 (instructions with location and severity).

Run (8 TPU/GPU devices; needs the credentialed data and the IP2P checkpoint):
  python train.py --config configs/ix2x_v2.py --workdir runs/ix2x_v2 \
      --config.data.manual_dir=/data/mimic_edit_instruction \
      --config.model.init_from=/weights/instruct-pix2pix
Same recipe as ix2x_v1.py but 6,500 steps. Expected: the paper's v2 model, EMA UNet exported to WORKDIR/export.
About half the step's FLOPs are the frozen VAE encode: --config.stage=latents then
--config.data.latent_cache=DIR trains from cached latents, without augmentation (README, Training).
"""

from x2x_jax.configs import ix2x_v1


def get_config():
    c = ix2x_v1.get_config()
    c.data.builder_config = "v2"
    c.train.steps = 6500
    return c
