"""The models a training run starts from: modules built for the target (compute dtype, remat, attention) and
their params (from `model.init_from` / `model.vae_from` / `model.text_encoder_from`, else random)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from x2x_jax import targets
from x2x_jax.convert import diffusers as bridge
from x2x_jax.convert.ldm_ckpt import load_ldm_checkpoint
from x2x_jax.diffusion.ddim import scheduler_config as default_scheduler_config
from x2x_jax.errors import ConfigError
from x2x_jax.models.clip_text import clip_text_from_config
from x2x_jax.models.layers import remat_policy
from x2x_jax.models.tokenizer import load_tokenizer, tokenize
from x2x_jax.models.unet import unet_from_config, unet_to_config
from x2x_jax.models.vae import latent_factor, vae_from_config


def compute_dtype(name: str, target=None):
    """The config's compute dtype; "auto" follows the target (a Mesh or devices; None: this host's devices)."""
    if name == "auto":
        return targets.default_compute_dtype(target)
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        raise ConfigError(f"train.compute_dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


@dataclasses.dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    params: dict  # {"unet": ..., "vae": ..., "text_encoder": ...}; ShapeDtypeStructs when built abstract
    tokenizer: Any
    scheduler_config: dict

    def empty_ids(self) -> jax.Array:
        """(L,) token ids of the empty prompt (the unconditional text)."""
        return jnp.asarray(tokenize(self.tokenizer, [""])[0][0])


def _random_params(module, example_inputs, key, abstract: bool):
    if abstract:
        return jax.eval_shape(module.init, key, *example_inputs)["params"]
    return jax.jit(module.init)(key, *example_inputs)["params"]


def build_components(config, key: jax.Array, target=None, *, with_unet: bool = True,
                     abstract: bool = False) -> Components:
    """Modules from the config (compute dtype, remat; the UNet's attention from the target:
    `targets.default_attention`) and params from `model.init_from` or random init.

    `model.vae_from` / `model.text_encoder_from` (diffusers dirs) override single components, which is how the
    synthetic default's UNet stage picks up the VAE its first stage trained. abstract=True: shapes only (the AOT
    compile), from the config's model dicts; no weights are read or initialised.
    """
    dtype = compute_dtype(config.train.compute_dtype, target)
    remat = remat_policy(config.train.remat)
    attention = targets.default_attention(target)
    m = config.model
    unet = unet_from_config(dict(m.unet), dtype=dtype, remat=remat, attention=attention)
    vae = vae_from_config(dict(m.vae), dtype=dtype, remat=remat)
    text = clip_text_from_config(dict(m.text_encoder), dtype=dtype, remat=False)
    k_unet, k_vae, k_text = jax.random.split(key, 3)
    res = config.data.resolution
    ids = jnp.zeros((1, text.max_position_embeddings), jnp.int32)
    params = {}
    tokenizer, sched = None, default_scheduler_config()

    if m.init_from and not abstract:
        if m.init_format == "diffusers":
            pipe = bridge.load_pipeline(m.init_from, allow_pickle=m.allow_pickle)
        elif m.init_format == "ldm":
            pipe = load_ldm_checkpoint(m.init_from, dict(m.unet), dict(m.vae), dict(m.text_encoder),
                                       allow_pickle=m.allow_pickle)
        else:
            raise ConfigError(f"model.init_format must be diffusers or ldm, got {m.init_format!r}")
        if pipe.unet.in_channels != unet.in_channels:  # SD 1.5 (4 channels) -> IP2P (8): zero-initialised
            pipe.unet_params, unet_cfg = bridge.expand_unet_in_channels(
                pipe.unet_params, unet_to_config(pipe.unet), unet.in_channels)
            pipe.unet = unet_from_config(unet_cfg)
        unet, vae, text = (pipe.unet.clone(dtype=dtype, remat=remat, attention=attention),
                           pipe.vae.clone(dtype=dtype, remat=remat), pipe.text_encoder.clone(dtype=dtype))
        params = {"unet": pipe.unet_params, "vae": pipe.vae_params, "text_encoder": pipe.text_params}
        tokenizer, sched = pipe.tokenizer, pipe.scheduler_config or sched
    for component, folder in (("vae", m.get("vae_from", "")), ("text_encoder", m.get("text_encoder_from", ""))):
        if folder and not abstract:
            module, p = bridge.load_component(Path(folder) / component, component)
            params[component] = p
            if component == "vae":
                vae = module.clone(dtype=dtype, remat=remat)
            else:
                text = module.clone(dtype=dtype)
    f = latent_factor(vae)
    if "vae" not in params:
        size = 8 * f if abstract else res  # the param shapes do not depend on the image size
        params["vae"] = _random_params(vae, (jnp.zeros((1, size, size, vae.in_channels)),), k_vae, abstract)
    if "text_encoder" not in params:
        params["text_encoder"] = _random_params(text, (ids,), k_text, abstract)
    if "unet" not in params and with_unet:
        lat = (1, res // f, res // f)
        params["unet"] = _random_params(unet, (jnp.zeros(lat + (unet.in_channels,)), jnp.zeros((1,)),
                                               jnp.zeros((1, ids.shape[1], text.hidden_size))), k_unet, abstract)
    if tokenizer is None:
        tokenizer = load_tokenizer()
    return Components(unet, vae, text, params, tokenizer, dict(sched))
