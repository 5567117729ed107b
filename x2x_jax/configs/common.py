"""Shared defaults for every training config (imported by the configs in this folder).

Not a config to run by itself: see synth_tiny.py, ix2x_v1.py, ix2x_v2.py.
"""

import ml_collections

from x2x_jax.models.architectures import clip_vit_l14_text, sd15_ip2p_unet, sd_vae


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stage = "unet"  # "vae" | "text" (a text tower for worlds without CLIP) | "unet" | "guidance" (the learned
    #                   guidance-map predictor, on a trained model) | "latents" (encode the training split into
    #                   data.latent_cache once; see training/latent_cache.py)

    c.data = ml_collections.ConfigDict()
    c.data.name = "synth_cxr_edit"  # TFDS builder: synth_cxr_edit | mimic_edit_instruction
    c.data.builder_config = "v1"
    c.data.data_dir = ""  # TFDS data_dir; "" = built next to the workdir
    c.data.manual_dir = ""  # mimic_edit_instruction: the released layout
    c.data.resolution = 512
    c.data.train_split = "train"
    c.data.val_split = "val"
    c.data.rotation_deg = 2.0
    c.data.flip_p = 0.5
    c.data.worker_count = 0
    c.data.latent_cache = ""  # a dir from stage=latents: the UNet stage reads latents, not images (no augmentation)

    c.model = ml_collections.ConfigDict()
    c.model.init_from = ""  # diffusers dir or LDM/IP2P .ckpt/.safetensors; "" = random init from the dicts below
    c.model.init_format = "diffusers"  # diffusers | ldm
    c.model.allow_pickle = False
    c.model.unet = sd15_ip2p_unet()
    c.model.vae = sd_vae()
    c.model.text_encoder = clip_vit_l14_text()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 4500
    c.train.per_device_batch = 4
    c.train.accum_steps = 1  # set by the configs so that per_device_batch * devices * accum = effective batch
    c.train.learning_rate = 1e-4
    c.train.weight_decay = 0.01
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.grad_clip = 0.0  # 0 = off
    c.train.ema_decay = 0.9999
    c.train.cond_dropout_p = 0.05
    c.train.vae_kl_weight = 1e-6
    c.train.compute_dtype = "auto"  # auto = bfloat16 on GPU/TPU, float32 on CPU
    c.train.remat = "full"  # none | full (recompute each block in the backward pass) | dots (layers.REMAT_POLICIES)
    c.train.param_sharding = "fsdp"  # fsdp | replicated
    # per_use: each FSDP weight shard all-gathered where used (every micro-step) | once: one replicated
    # compute-dtype copy per step through the accumulation loop (ZeRO-2; training/step.py GatherOnce)
    c.train.gather_params = "per_use"
    c.train.mesh_data = -1
    c.train.mesh_fsdp = 1
    c.train.compilation_cache = "auto"  # persistent compilation cache: WORKDIR/jax_cache on accelerators, "" = off

    # Stage "guidance" (x2x_jax/training/stages/guidance.py): a small predictor of the guidance map, distilled from the
    # frozen trained model's expected relevance map (mean over `draws` noise draws of R * M_pseudo) and, where the
    # data set has change masks, supervised by them. guidance_stage overrides train.* for that stage.
    c.guidance = ml_collections.ConfigDict()
    c.guidance.model_from = ""  # the trained diffusers dir (unet/, vae/, text_encoder/) to distil from
    c.guidance.draws = 8  # K relevance noise draws per example for the distillation target
    c.guidance.noise_level = 0.8  # relevance timestep as a fraction of T (the paper's)
    c.guidance.distill_weight = 1.0  # MSE(P * M, E[R] * M)
    c.guidance.mask_weight = 1.0  # BCE(P, pooled change mask) over the prior's support
    c.guidance.dice_weight = 0.0  # 1 - soft Dice(P * M, pooled change mask): overlap of the map the edit thresholds
    c.guidance.block_out_channels = (32, 64, 64)
    c.guidance.attention_heads = 4
    c.guidance.norm_num_groups = 8
    c.guidance_stage = dict(steps=2000, per_device_batch=16, learning_rate=1e-3, ema_decay=0.99)

    c.log = ml_collections.ConfigDict()
    c.log.every = 10
    c.log.checkpoint_every = 500
    c.log.keep = 3
    c.log.sample_every = 500  # WORKDIR/samples/step_N.png: past | edited | target (UNet stage; 0 = off)
    c.log.sample_steps = 20  # DDIM steps of those sample edits
    c.log.export_ema = True
    return c
