"""The SD 1.x conditional UNet in Flax Linen, numerically equivalent to diffusers' PyTorch `UNet2DConditionModel`.

Layout NHWC. The module's fields are the diffusers config.json keys it supports, with diffusers' defaults, so
`unet_from_config(json.load(...))` / `unet_to_config(model)` move between the two; keys we do not implement
raise `ConfigError` unless they hold diffusers' default. Parameter paths mirror diffusers' module names
(`down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight` ->
`down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q/kernel`).

diffusers quirk kept on purpose: in SD 1.x configs `attention_head_dim` is the number of heads of each block's
transformer (diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`); head width is
channels // heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from x2x_jax.errors import ConfigError
from x2x_jax.models.configs import DIFFUSERS_VERSION, listify, parse_config
from x2x_jax.models.layers import (
    ACTIVATIONS,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    UNetMidBlock2D,
    Upsample2D,
    activation,
    batch_sharded,
    conv,
    rematted,
    timestep_embedding,
)

Dtype = Any
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


class DownBlock(nn.Module):
    """diffusers `CrossAttnDownBlock2D` (`cross_attention=True`) or `DownBlock2D`.

    (resnet [-> transformer]) x num_layers, then an optional stride-2 conv. Returns (hidden, per-layer outputs).
    """

    out_channels: int
    num_layers: int
    resnet_groups: int
    resnet_eps: float
    resnet_act_fn: str = "silu"
    add_downsample: bool = True
    downsample_padding: int = 1
    cross_attention: bool = False
    heads: int = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32
    remat: bool | str = False
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, temb, context):
        resnet_cls, transformer_cls = _layers(self.remat)
        states = ()
        for i in range(self.num_layers):
            x = resnet_cls(self.out_channels, self.resnet_groups, self.resnet_eps, self.resnet_act_fn,
                           dtype=self.dtype, name=f"resnets_{i}")(x, temb)
            if self.cross_attention:
                x = transformer_cls(self.heads, self.out_channels // self.heads, self.resnet_groups,
                                    self.use_linear_projection, upcast_attention=self.upcast_attention,
                                    dtype=self.dtype, attention=self.attention, name=f"attentions_{i}")(x, context)
            states += (x,)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype, name="downsamplers_0")(x)
            states += (x,)
        return x, states


class UpBlock(nn.Module):
    """diffusers `CrossAttnUpBlock2D` (`cross_attention=True`) or `UpBlock2D`.

    For each layer: concat(hidden, the last remaining skip) on channels -> resnet [-> transformer]; then an
    optional nearest-x2 (or to `upsample_size`) + conv.
    """

    out_channels: int
    num_layers: int
    resnet_groups: int
    resnet_eps: float
    resnet_act_fn: str = "silu"
    add_upsample: bool = True
    cross_attention: bool = False
    heads: int = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32
    remat: bool | str = False
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        resnet_cls, transformer_cls = _layers(self.remat)
        skips = tuple(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = resnet_cls(self.out_channels, self.resnet_groups, self.resnet_eps, self.resnet_act_fn,
                           dtype=self.dtype, name=f"resnets_{i}")(x, temb)
            if self.cross_attention:
                x = transformer_cls(self.heads, self.out_channels // self.heads, self.resnet_groups,
                                    self.use_linear_projection, upcast_attention=self.upcast_attention,
                                    dtype=self.dtype, attention=self.attention, name=f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


class MidBlockCrossAttn(nn.Module):
    """diffusers `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) x num_layers."""

    heads: int
    resnet_groups: int
    resnet_eps: float
    resnet_act_fn: str = "silu"
    output_scale_factor: float = 1.0
    num_layers: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32
    remat: bool | str = False
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, temb, context):
        resnet_cls, transformer_cls = _layers(self.remat)
        c = x.shape[-1]

        def resnet(i):
            return resnet_cls(c, self.resnet_groups, self.resnet_eps, self.resnet_act_fn, self.output_scale_factor,
                              dtype=self.dtype, name=f"resnets_{i}")

        x = resnet(0)(x, temb)
        for i in range(self.num_layers):
            x = transformer_cls(self.heads, c // self.heads, self.resnet_groups, self.use_linear_projection,
                                upcast_attention=self.upcast_attention, dtype=self.dtype,
                                attention=self.attention, name=f"attentions_{i}")(x, context)
            x = resnet(i + 1)(x, temb)
        return x


def _layers(remat):
    """(resnet, transformer) module classes, each under the remat policy `remat` (layers.rematted)."""
    return rematted(ResnetBlock2D, remat), rematted(Transformer2DModel, remat)


def _per_block(value, n: int, key: str) -> tuple:
    """diffusers' broadcast of an int (or bool) config value to one value per down block."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"{key}: {list(value)} must have one entry per down block ({n})")
        return tuple(value)
    return (value,) * n


class UNet2DConditionModel(nn.Module):
    """diffusers `UNet2DConditionModel` (SD 1.x family). `__call__(sample NHWC, timesteps, context) -> NHWC`.

    Fields are diffusers config keys with diffusers' defaults (plus `dtype`, the compute dtype, `remat`, which
    wraps each resnet and transformer in the remat policy it names (`layers.rematted`; True = recompute in the
    backward pass), and `attention`, the attention implementation of every
    transformer: layers.attention; `targets.default_attention(target)` picks it for the devices compiled for).
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    # not diffusers config keys:
    dtype: Dtype = jnp.float32
    remat: bool | str = False
    attention: str = "einsum"

    def check(self) -> None:
        """Raise ConfigError if the configuration is outside what this module implements."""
        n = len(self.block_out_channels)
        if n == 0:
            raise ConfigError("block_out_channels: must not be empty")
        for key, types, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                    ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
            if len(types) != n:
                raise ConfigError(f"{key}: {list(types)} must have as many entries as block_out_channels ({n})")
            for t in types:
                if t not in allowed:
                    raise ConfigError(f"{key}: block type {t!r} is not supported (supported: {list(allowed)})")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ConfigError(f"mid_block_type: {self.mid_block_type!r} is not supported "
                              f"(supported: {list(MID_BLOCK_TYPES)})")
        if any(_per_block(self.only_cross_attention, n, "only_cross_attention")):
            raise ConfigError(f"only_cross_attention: {self.only_cross_attention!r} is not supported (only False)")
        _per_block(self.layers_per_block, n, "layers_per_block")
        _per_block(self.attention_head_dim, n, "attention_head_dim")
        if not isinstance(self.cross_attention_dim, int):
            raise ConfigError(f"cross_attention_dim: {self.cross_attention_dim!r} is not supported (one int only)")
        if not isinstance(self.norm_num_groups, int):
            raise ConfigError(f"norm_num_groups: {self.norm_num_groups!r} is not supported (an int only)")
        if self.act_fn.lower() not in ACTIVATIONS:
            raise ConfigError(f"act_fn: {self.act_fn!r} is not supported (supported: {sorted(ACTIVATIONS)})")

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states):
        self.check()
        n = len(self.block_out_channels)
        layers = _per_block(self.layers_per_block, n, "layers_per_block")
        heads = _per_block(self.attention_head_dim, n, "attention_head_dim")
        if encoder_hidden_states.shape[-1] != self.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states has width {encoder_hidden_states.shape[-1]}, "
                             f"cross_attention_dim is {self.cross_attention_dim}")
        dt = self.dtype
        context = encoder_hidden_states.astype(dt)
        # remat per resnet / transformer (inside the blocks), not per block: the backward pass then holds one
        # layer's internals at a time, and only layer inputs are kept from the forward pass.
        common = dict(resnet_groups=self.norm_num_groups, resnet_eps=self.norm_eps, resnet_act_fn=self.act_fn,
                      dtype=dt, remat=self.remat)
        attn = dict(use_linear_projection=self.use_linear_projection, upcast_attention=self.upcast_attention,
                    attention=self.attention)
        down_cls, up_cls = DownBlock, UpBlock
        mid_cls = MidBlockCrossAttn if self.mid_block_type == "UNetMidBlock2DCrossAttn" else UNetMidBlock2D
        if mid_cls is UNetMidBlock2D:  # a single resnet
            mid_cls = rematted(mid_cls, self.remat)

        batch = sample.shape[0]
        # diffusers: when H or W is not a multiple of 2**num_upsamplers, upsample to the skip's size instead of x2
        up_factor = 2 ** (n - 1)
        forward_upsample_size = any(d % up_factor for d in sample.shape[1:3])

        x = sample.astype(dt)
        if self.center_input_sample:
            x = 2 * x - 1.0
        t = jnp.asarray(timesteps)
        t = jnp.broadcast_to(t.reshape(-1) if t.ndim else t, (batch,))
        t_emb = timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift).astype(dt)
        temb = TimestepEmbedding(4 * self.block_out_channels[0], self.act_fn, dtype=dt, name="time_embedding")(t_emb)
        temb = batch_sharded(temb)

        x = batch_sharded(conv(self.block_out_channels[0], 3, name="conv_in", dtype=dt)(x))
        skips = (x,)
        for i, block_type in enumerate(self.down_block_types):
            x, states = down_cls(self.block_out_channels[i], layers[i], add_downsample=i < n - 1,
                                 downsample_padding=self.downsample_padding,
                                 cross_attention=block_type == "CrossAttnDownBlock2D", heads=heads[i], **attn,
                                 **common, name=f"down_blocks_{i}")(x, temb, context)
            skips += states

        if self.mid_block_type == "UNetMidBlock2DCrossAttn":
            x = mid_cls(heads[-1], output_scale_factor=self.mid_block_scale_factor, **attn, **common,
                        name="mid_block")(x, temb, context)
        elif self.mid_block_type == "UNetMidBlock2D":
            x = mid_cls(0, self.norm_eps, self.act_fn, self.norm_num_groups, self.mid_block_scale_factor,
                        add_attention=False, dtype=dt, name="mid_block")(x, temb)

        rev_channels = self.block_out_channels[::-1]
        for i, block_type in enumerate(self.up_block_types):
            is_final = i == n - 1
            num_layers = layers[::-1][i] + 1
            block_skips, skips = skips[-num_layers:], skips[:-num_layers]
            upsample_size = tuple(skips[-1].shape[1:3]) if (forward_upsample_size and not is_final) else None
            x = up_cls(rev_channels[i], num_layers, add_upsample=not is_final,
                       cross_attention=block_type == "CrossAttnUpBlock2D", heads=heads[::-1][i], **attn, **common,
                       name=f"up_blocks_{i}")(x, block_skips, temb, context, upsample_size)

        x = GroupNorm(self.norm_num_groups, self.norm_eps, dtype=dt, name="conv_norm_out")(x)
        x = activation(self.act_fn)(x)
        return conv(self.out_channels, 3, name="conv_out", dtype=dt)(x)


# --------------------------------------------------------------------------------------------- config I/O

_FIELDS = tuple(f.name for f in dataclasses.fields(UNet2DConditionModel)
                if f.name not in ("dtype", "remat", "attention", "parent", "name"))

# diffusers config keys we accept only at (one of) these values: anything else is a feature we do not implement.
_FIXED: dict[str, tuple] = {
    "dropout": (0.0,),
    "transformer_layers_per_block": (1,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
# Keys that have no effect given the above (e.g. only read when addition_embed_type is set).
_IRRELEVANT = frozenset({"addition_embed_type_num_heads"})


def unet_from_config(config: Mapping[str, Any], dtype: Dtype = jnp.float32, remat: bool | str = False,
                     attention: str = "einsum") -> UNet2DConditionModel:
    """A `UNet2DConditionModel` from a diffusers `unet/config.json` dict.

    Keys starting with `_` are ignored; keys for features we do not implement raise ConfigError unless they hold
    diffusers' default value.
    """
    kwargs = parse_config(config, _FIELDS, _FIXED, _IRRELEVANT, "unet")
    cad = kwargs.get("cross_attention_dim")
    if isinstance(cad, tuple):  # one value per block is fine as long as it is one value
        if len(set(cad)) != 1:
            raise ConfigError(f"unet config: cross_attention_dim={list(cad)} is not supported (one int only)")
        kwargs["cross_attention_dim"] = cad[0]
    model = UNet2DConditionModel(**kwargs, dtype=dtype, remat=remat, attention=attention)
    model.check()
    return model


def unet_to_config(model: UNet2DConditionModel) -> dict[str, Any]:
    """The diffusers `UNet2DConditionModel` config dict (what `from_config` / config.json take) of `model`."""
    config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION}
    config.update({key: listify(getattr(model, key)) for key in _FIELDS})
    return config
