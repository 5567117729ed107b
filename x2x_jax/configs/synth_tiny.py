"""synth_tiny: the embedded default — a tiny VAE + tiny IP2P UNet on the synthetic chest-radiograph edit set.

Run (2 CPU cores, no downloads; this is what plain `python train.py` runs):
  python train.py --config configs/synth_tiny.py --workdir runs/synth_tiny
Stage 1 trains a small KL autoencoder (64 px grey -> 16x16x4 latents), stage 2 a small CLIP text encoder,
contrastively against the change each instruction describes (there is no pretrained CLIP for this world: see
training/stages/text.py), stage 3 a small 8-channel UNet on (past, instruction, current) with that VAE and text
encoder frozen, as the paper's recipe freezes CLIP. The synthetic
dataset is built with TFDS on first use (under WORKDIR/data unless data.data_dir is set).
Expected: WORKDIR/unet/export is a diffusers directory (a few MB) that edit.py loads; on the synthetic val split
the edited images are measurably closer to the true current image inside the change region than the unedited
past image is (see README "Training").

The learned guidance-map predictor (a separate stage on a trained model; default: the shipped one):
  python train.py --config configs/synth_tiny.py --workdir runs/synth_tiny --config.stage=guidance
Expected: WORKDIR/guidance/export (config.json + safetensors, ~2 MB); copied to <model>/guidance/ it is what
`edit.py --guidance learned` uses (the shipped one: x2x_jax/assets/synth_tiny/guidance/, see its README).
"""

import os

from x2x_jax.configs.common import base_config

SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "synth_tiny")


def get_config():
    c = base_config()
    c.stage = "all"  # vae, text, then unet
    c.data.name = "synth_cxr_edit"
    c.data.builder_config = "v1"
    c.data.resolution = 64

    c.model.unet = dict(
        in_channels=8, out_channels=4, sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4, cross_attention_dim=32,
        norm_num_groups=8,
    )
    c.model.vae = dict(
        in_channels=1, out_channels=1, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=1.0,
    )
    c.model.text_encoder = dict(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=32,
    )
    c.model.vae_from = ""  # set by the "all" run to the VAE stage's export (and text_encoder_from to the text stage's)

    c.train.steps = 1500
    c.train.per_device_batch = 16
    c.train.accum_steps = 1
    c.train.learning_rate = 5e-4
    c.train.ema_decay = 0.999
    c.train.remat = "none"
    c.train.compute_dtype = "float32"

    c.vae_stage = dict(steps=400, per_device_batch=8, learning_rate=1e-3, ema_decay=0.99)  # 8 pairs = 16 images
    c.text_stage = dict(steps=600, per_device_batch=64, learning_rate=2e-3, ema_decay=0.99)

    c.guidance.model_from = SHIPPED_MODEL
    # The synthetic set has true change masks: supervised by them alone (BCE + Dice), the predictor localizes better
    # than when also distilled from this tiny model's relevance map (x2x_jax/assets/synth_tiny/README.md has the
    # ablation); distill_weight > 0 brings the distillation back (draws: its K).
    c.guidance.distill_weight = 0.0
    c.guidance.dice_weight = 1.0
    c.guidance.draws = 4
    c.guidance_stage = dict(steps=3000, per_device_batch=16, learning_rate=1e-3, ema_decay=0.99)

    c.log.every = 25
    c.log.checkpoint_every = 500
    c.log.sample_every = 0
    return c
