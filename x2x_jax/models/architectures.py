"""The model architectures of the paper's recipe (Stable Diffusion 1.5 / InstructPix2Pix), as diffusers' and
transformers' config.json files spell them. Used by the training configs (configs/common.py) and by AOT compiles
that need the SD1.5 shapes without weights (`--model sd15`)."""


def sd15_ip2p_unet() -> dict:
    """The SD 1.5 / InstructPix2Pix UNet (8 input channels), as diffusers' unet/config.json spells it."""
    return dict(
        in_channels=8, out_channels=4, sample_size=64,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
        cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, use_linear_projection=False,
        flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
    )


def sd_vae() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
        scaling_factor=0.18215,
    )


def clip_vit_l14_text() -> dict:
    return dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, projection_dim=768,
    )
