"""InstructX2X v1: the paper's recipe on MIMIC-EDIT-INSTRUCTION v1.

Run (8 TPU/GPU devices; needs the credentialed data and the IP2P checkpoint):
  python train.py --config configs/ix2x_v1.py --workdir runs/ix2x_v1 \
      --config.data.manual_dir=/data/mimic_edit_instruction \
      --config.model.init_from=/weights/instruct-pix2pix  # diffusers dir, or an .ckpt with init_format=ldm
512 px, AdamW 1e-4 constant (wd 0.01), 4 images/device, gradient accumulation to an effective batch of 1024,
4,500 steps, EMA 0.9999 (LDM warm-up), conditioning dropout 5/5/5 %, +-2 deg rotation, h-flip 0.5.
Expected: the paper's v1 model; the EMA UNet is exported to WORKDIR/export as a diffusers directory.
About half the step's FLOPs are the frozen VAE encode: --config.stage=latents then
--config.data.latent_cache=DIR trains from cached latents, without augmentation (README, Training).
"""

from x2x_jax.configs.common import base_config

EFFECTIVE_BATCH = 1024


def get_config():
    c = base_config()
    c.data.name = "mimic_edit_instruction"
    c.data.builder_config = "v1"
    c.data.resolution = 512
    c.model.init_format = "diffusers"
    c.train.steps = 4500
    c.train.per_device_batch = 4
    c.train.accum_steps = -1  # -1: EFFECTIVE_BATCH / (per_device_batch * device count), computed at start
    c.train.effective_batch = EFFECTIVE_BATCH
    return c
