"""The SD VAE (`AutoencoderKL`) in Flax Linen, numerically equivalent to diffusers' PyTorch `AutoencoderKL`.

Layout NHWC. Fields are the diffusers config.json keys (with diffusers' defaults) plus `dtype` and `remat`;
parameter paths mirror diffusers' module names (`encoder.mid_block.attentions.0.to_q.weight` ->
`encoder/mid_block/attentions_0/to_q/kernel`).

`encode(x) -> (mean, logvar)` gives the parameters of diffusers' `DiagonalGaussianDistribution` (logvar clipped
to [-30, 20]); `posterior_sample` / `posterior_mode` are its `sample()` / `mode()`. Latents are *not* multiplied
by `scaling_factor` here: that is the caller's business, as in diffusers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from x2x_jax.errors import ConfigError
from x2x_jax.models.layers import (
    ACTIVATIONS,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    UNetMidBlock2D,
    Upsample2D,
    conv,
    rematted,
)
from x2x_jax.models.configs import DIFFUSERS_VERSION, listify, parse_config

Dtype = Any
VAE_EPS = 1e-6  # diffusers hard-codes resnet / norm eps 1e-6 in the VAE


class DownEncoderBlock2D(nn.Module):
    """diffusers `DownEncoderBlock2D`: resnets (no temb), then an optional stride-2 conv with (0, 1, 0, 1) pad."""

    out_channels: int
    num_layers: int
    resnet_groups: int
    resnet_act_fn: str = "silu"
    add_downsample: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.resnet_groups, VAE_EPS, self.resnet_act_fn, dtype=self.dtype,
                              name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """diffusers `UpDecoderBlock2D`: resnets (no temb, no skips), then optional nearest-x2 + conv."""

    out_channels: int
    num_layers: int
    resnet_groups: int
    resnet_act_fn: str = "silu"
    add_upsample: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.resnet_groups, VAE_EPS, self.resnet_act_fn, dtype=self.dtype,
                              name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class _Coder(nn.Module):
    """What Encoder and Decoder share: the AutoencoderKL fields they read."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    act_fn: str
    latent_channels: int
    norm_num_groups: int
    mid_block_add_attention: bool = True
    out_channels: int = 3
    dtype: Dtype = jnp.float32
    remat: bool | str = False

    def _cls(self, cls):
        return rematted(cls, self.remat)

    def mid_block(self, x):
        # diffusers: UNetMidBlock2D(attention_head_dim=channels) -> a single-head attention with GroupNorm
        return self._cls(UNetMidBlock2D)(1, VAE_EPS, self.act_fn, self.norm_num_groups,
                                        add_attention=self.mid_block_add_attention,
                                        attention_head_dim=self.block_out_channels[-1], dtype=self.dtype,
                                        name="mid_block")(x)

    def norm_act_conv_out(self, x, features):
        x = jax.nn.silu(GroupNorm(self.norm_num_groups, VAE_EPS, dtype=self.dtype, name="conv_norm_out")(x))
        return conv(features, 3, name="conv_out", dtype=self.dtype)(x)


class Encoder(_Coder):
    """diffusers `Encoder` (double_z=True): conv_in, down blocks, mid block, GroupNorm, SiLU, conv_out -> 2*latent."""

    @nn.compact
    def __call__(self, x):
        n = len(self.block_out_channels)
        x = conv(self.block_out_channels[0], 3, name="conv_in", dtype=self.dtype)(x.astype(self.dtype))
        for i, ch in enumerate(self.block_out_channels):
            x = self._cls(DownEncoderBlock2D)(ch, self.layers_per_block, self.norm_num_groups, self.act_fn,
                                              add_downsample=i < n - 1, dtype=self.dtype, name=f"down_blocks_{i}")(x)
        x = self.mid_block(x)
        return self.norm_act_conv_out(x, 2 * self.latent_channels)


class Decoder(_Coder):
    """diffusers `Decoder` (norm_type="group"): conv_in, mid block, up blocks, GroupNorm, SiLU, conv_out."""

    @nn.compact
    def __call__(self, z):
        n = len(self.block_out_channels)
        x = conv(self.block_out_channels[-1], 3, name="conv_in", dtype=self.dtype)(z.astype(self.dtype))
        x = self.mid_block(x)
        for i, ch in enumerate(self.block_out_channels[::-1]):
            x = self._cls(UpDecoderBlock2D)(ch, self.layers_per_block + 1, self.norm_num_groups, self.act_fn,
                                            add_upsample=i < n - 1, dtype=self.dtype, name=f"up_blocks_{i}")(x)
        return self.norm_act_conv_out(x, self.out_channels)


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL`. `encode(x) -> (mean, logvar)`, `decode(z) -> x`, `__call__(x)` = decode(mean).

    Fields are diffusers config keys with diffusers' defaults; `scaling_factor`, `sample_size` and `force_upcast`
    are carried for the pipeline and the config round trip and do not change the computation.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # not diffusers config keys:
    dtype: Dtype = jnp.float32
    remat: bool | str = False

    def check(self) -> None:
        """Raise ConfigError if the configuration is outside what this module implements."""
        n = len(self.block_out_channels)
        if n == 0:
            raise ConfigError("block_out_channels: must not be empty")
        for key, types, allowed in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                    ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            if len(types) != n:
                raise ConfigError(f"{key}: {list(types)} must have as many entries as block_out_channels ({n})")
            for t in types:
                if t != allowed:
                    raise ConfigError(f"{key}: block type {t!r} is not supported (only {allowed!r})")
        if self.act_fn.lower() not in ACTIVATIONS:
            raise ConfigError(f"act_fn: {self.act_fn!r} is not supported (supported: {sorted(ACTIVATIONS)})")

    def setup(self):
        self.check()
        coder = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                     act_fn=self.act_fn, latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups,
                     mid_block_add_attention=self.mid_block_add_attention, out_channels=self.out_channels,
                     dtype=self.dtype, remat=self.remat)
        self.encoder = Encoder(**coder)
        self.decoder = Decoder(**coder)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, 1, name="quant_conv", dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, 1, name="post_quant_conv", dtype=self.dtype)

    def encode(self, x):
        """NHWC image -> (mean, logvar), each (B, h, w, latent_channels); logvar clipped to [-30, 20]."""
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """NHWC latent (unscaled) -> NHWC image."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)


def posterior_sample(mean, logvar, key):
    """`DiagonalGaussianDistribution.sample()`: mean + exp(logvar / 2) * N(0, 1)."""
    std = jnp.exp(0.5 * logvar)
    return mean + std * jax.random.normal(key, mean.shape, mean.dtype)


def posterior_mode(mean, logvar):
    """`DiagonalGaussianDistribution.mode()`: the mean."""
    del logvar
    return mean


# --------------------------------------------------------------------------------------------- config I/O

_FIELDS = tuple(f.name for f in dataclasses.fields(AutoencoderKL) if f.name not in ("dtype", "remat", "parent", "name"))
_FIXED: dict[str, tuple] = {
    # latent normalisation variants (SD3/Flux-style): our pipeline only applies scaling_factor.
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
}


def latent_factor(vae: AutoencoderKL) -> int:
    """Image size / latent size: the encoder downsamples once per block but the last."""
    return 2 ** (len(vae.block_out_channels) - 1)


def vae_from_config(config: Mapping[str, Any], dtype: Dtype = jnp.float32, remat: bool | str = False) -> AutoencoderKL:
    """An `AutoencoderKL` from a diffusers `vae/config.json` dict (keys starting with `_` ignored)."""
    model = AutoencoderKL(**parse_config(config, _FIELDS, _FIXED, frozenset(), "vae"), dtype=dtype, remat=remat)
    model.check()
    return model


def vae_to_config(model: AutoencoderKL) -> dict[str, Any]:
    """The diffusers `AutoencoderKL` config dict of `model`."""
    config = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION}
    config.update({key: listify(getattr(model, key)) for key in _FIELDS})
    return config


# ----------------------------------------------------------------------------------------------- frozen-VAE helpers


def to_vae_channels(images: jax.Array, channels: int) -> jax.Array:
    """(B, H, W) grey images in [-1, 1] -> (B, H, W, channels) as the VAE expects (grey repeated)."""
    return jnp.repeat(images[..., None], channels, axis=-1)


def encode_pair(vae, vae_params, past: jax.Array, current: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """IP2P's frozen-VAE work on grey (B, H, W) pairs: current's posterior mean and log-variance, past's latent
    (the posterior mode, unscaled). One encoder call on both images (one copy of the encoder in the compiled
    program: the TPU compile of the SD1.5 step spends ~40 s per copy)."""
    # Interleaved (current_0, past_0, current_1, ...), not concatenated: a batch-sharded pair stays on its devices
    # (a concatenation would move rows between devices).
    both = jnp.stack([current, past], axis=1).reshape(-1, *current.shape[1:])
    mean, logvar = vae.apply({"params": vae_params}, to_vae_channels(both, vae.in_channels), method=vae.encode)
    mean, logvar = (x.reshape(current.shape[0], 2, *x.shape[1:]) for x in (mean, logvar))
    return mean[:, 0], logvar[:, 0], mean[:, 1]


def decode_grey(vae, vae_params, latents: jax.Array) -> jax.Array:
    """Unscaled latents -> fp32 grey (B, H, W) images in [-1, 1] (the mean over the VAE's output channels)."""
    decoded = vae.apply({"params": vae_params}, latents, method=vae.decode)
    return jnp.clip(jnp.mean(decoded.astype(jnp.float32), axis=-1), -1.0, 1.0)
