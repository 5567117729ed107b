"""The learned guidance-map predictor: source-image latents + instruction -> where the edit should happen.

An alternative to the relevance map R of Region-Specific Editing (x2x_jax/editing/rse.py). Given the source
image's latents (the VAE posterior mode, exactly what InstructPix2Pix conditions on) and the CLIP text hidden
states of the instruction, it predicts a map P in [0, 1] at latent resolution. At edit time the guidance map is
G = P * M_pseudo (the same anatomical prior the relevance path multiplies in) and the mask M = G >= tau, as before.
Trained by `python train.py --config.stage=guidance` (x2x_jax/training/stages/guidance.py).

Network (NHWC, fp32 params, compute `dtype`): two fixed coordinate channels (y, x in [-1, 1]; no parameters) are
appended to the latents, because where a finding can appear is a matter of position; a small U-Net over
len(block_out_channels) levels with one `ResnetBlock2D` per level on the way down and up, cross-attention to the
text at every level below the first (the instruction decides which finding and which side), self-attention at
the coarsest level, and a 3x3 conv to one channel followed by a sigmoid. At the synth_tiny size (16x16x4 latents,
32-d text, channels (32, 64, 64)) it has 0.48 M parameters.

Saved like the other components: a folder with `config.json` (`_class_name` GuidancePredictor) and
`diffusion_pytorch_model.safetensors` in torch layout through the same rename/transpose table
(x2x_jax/convert/guidance.py). A model directory may carry it as `guidance/` beside unet/, vae/, ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from x2x_jax.errors import ConfigError
from x2x_jax.models.layers import (Attention, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv,
                                   layer_norm)

CLASS_NAME = "GuidancePredictor"
WEIGHTS_STEM = "diffusion_pytorch_model"
_FIELDS = ("latent_channels", "cross_attention_dim", "block_out_channels", "attention_heads", "norm_num_groups")


class TextBlock(nn.Module):
    """Pre-norm attention residuals on NHWC features: [self-attention], cross-attention to the text."""

    heads: int
    self_attention: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        c = x.shape[-1]
        if c % self.heads:
            raise ConfigError(f"guidance: attention_heads={self.heads} does not divide {c} channels")
        if self.self_attention:
            h = layer_norm(1e-5, name="norm1", dtype=self.dtype)(x)
            x = x + Attention(self.heads, c // self.heads, dtype=self.dtype, name="attn1")(h)
        h = layer_norm(1e-5, name="norm2", dtype=self.dtype)(x)
        return x + Attention(self.heads, c // self.heads, dtype=self.dtype, name="attn2")(h, context)


class GuidancePredictor(nn.Module):
    """(B, h, w, latent_channels) latents, (B, T, cross_attention_dim) text states -> (B, h, w) map in [0, 1]."""

    latent_channels: int = 4
    cross_attention_dim: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    attention_heads: int = 4
    norm_num_groups: int = 8
    dtype: Any = jnp.float32

    def check(self) -> None:
        if not self.block_out_channels or any(ch % self.norm_num_groups for ch in self.block_out_channels):
            raise ConfigError(f"guidance: block_out_channels={list(self.block_out_channels)} must be non-empty "
                              f"multiples of norm_num_groups={self.norm_num_groups}")

    @nn.compact
    def __call__(self, latents, context):
        b, h, w, _ = latents.shape
        levels = len(self.block_out_channels)
        if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
            raise ConfigError(f"guidance: latents {h}x{w} do not halve {levels - 1} times")
        ys, xs = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w), indexing="ij")
        coords = jnp.broadcast_to(jnp.stack([ys, xs], -1), (b, h, w, 2))
        x = jnp.concatenate([latents.astype(jnp.float32), coords], -1).astype(self.dtype)
        context = context.astype(self.dtype)
        g, eps = self.norm_num_groups, 1e-5
        x = conv(self.block_out_channels[0], 3, name="conv_in", dtype=self.dtype)(x)

        skips = []
        for i, ch in enumerate(self.block_out_channels):
            if i > 0:
                x = Downsample2D(ch, dtype=self.dtype, name=f"down_{i}")(x)
            x = ResnetBlock2D(ch, g, eps, dtype=self.dtype, name=f"down_res_{i}")(x)
            if i > 0:
                x = TextBlock(self.attention_heads, self_attention=i == levels - 1, dtype=self.dtype,
                              name=f"down_attn_{i}")(x, context)
            skips.append(x)
        for i in reversed(range(levels - 1)):
            ch = self.block_out_channels[i]
            x = Upsample2D(ch, dtype=self.dtype, name=f"up_{i}")(x)
            x = ResnetBlock2D(ch, g, eps, dtype=self.dtype, name=f"up_res_{i}")(jnp.concatenate([x, skips[i]], -1))
            if i > 0:
                x = TextBlock(self.attention_heads, dtype=self.dtype, name=f"up_attn_{i}")(x, context)
        x = nn.silu(GroupNorm(g, eps, dtype=self.dtype, name="norm_out")(x))
        logits = conv(1, 3, name="conv_out", dtype=self.dtype)(x)[..., 0]
        return jax.nn.sigmoid(logits.astype(jnp.float32))


# ------------------------------------------------------------------------------------------- config, files


def guidance_from_config(config: Mapping[str, Any], dtype: Any = jnp.float32) -> GuidancePredictor:
    """A `GuidancePredictor` from its config.json dict (keys starting with `_` are ignored)."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _FIELDS)
    if unknown:
        raise ConfigError(f"guidance config: unknown keys {unknown} (known: {', '.join(_FIELDS)})")
    if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ConfigError(f"guidance config: _class_name={config['_class_name']!r} is not {CLASS_NAME}")
    kwargs = {k: config[k] for k in _FIELDS if k in config}
    if "block_out_channels" in kwargs:
        kwargs["block_out_channels"] = tuple(int(c) for c in kwargs["block_out_channels"])
    model = GuidancePredictor(**kwargs, dtype=dtype)
    model.check()
    return model


def guidance_to_config(model: GuidancePredictor) -> dict[str, Any]:
    config = {"_class_name": CLASS_NAME}
    config.update({k: getattr(model, k) for k in _FIELDS})
    config["block_out_channels"] = list(config["block_out_channels"])
    return config


def init_params(model: GuidancePredictor, key: jax.Array, latent_hw: tuple[int, int] = (16, 16)) -> dict:
    latents = jnp.zeros((1, *latent_hw, model.latent_channels), jnp.float32)
    context = jnp.zeros((1, 1, model.cross_attention_dim), jnp.float32)
    return jax.jit(model.init)(key, latents, context)["params"]


def abstract_params(model: GuidancePredictor) -> dict:
    size = 2 ** (len(model.block_out_channels) - 1)
    return jax.eval_shape(lambda k: init_params(model, k, (size, size)), jax.random.key(0))
