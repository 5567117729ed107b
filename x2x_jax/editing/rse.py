"""Region-Specific Editing as one compiled program.

For a batch of (image, instruction, prior, seed): VAE encode -> text encode -> relevance map R -> guidance map
G = prior (pooled to latent resolution) * R -> mask M = G >= tau -> masked DDIM loop with 3-way CFG (one batched
UNet call per step) -> VAE decode -> composite with the input outside M.

Static (one compilation each): batch, resolution, number of steps, number of relevance draws. Traced: images,
token ids, priors, seeds, tau, guidance scales, noise level and the re-noise mode, so editing with other values
never recompiles.

Re-noising: after each DDIM step x_t -> x_{t_prev} the latent outside M is replaced by the source latent noised
to t_prev (the timestep the latent is at; "correct", the default). The original code re-noises to t, one step
behind ("paper", available for reproduction). Both reuse the single noise draw that made the start latent.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from x2x_jax.diffusion.ddim import ddim_prev_timesteps, ddim_step, ddim_timesteps
from x2x_jax.diffusion.schedule import NoiseSchedule, add_noise
from x2x_jax.editing.relevance import relevance_from_eps
from x2x_jax.training.step import to_vae_channels

RENOISE_MODES = ("correct", "paper")


@dataclasses.dataclass(frozen=True)
class EditModel:
    """Modules (static) and their parameters (pytrees) needed to edit."""

    unet: Any
    vae: Any
    text_encoder: Any
    schedule: NoiseSchedule
    scheduler_config: dict

    def __hash__(self):  # modules are hashable dataclasses; the config dict is not
        return hash((self.unet, self.vae, self.text_encoder))

    def __eq__(self, other):
        return self is other


@dataclasses.dataclass(frozen=True)
class EditParams:
    tau: float = 0.1
    text_scale: float = 7.5
    image_scale: float = 1.5
    noise_level: float = 0.8
    renoise: str = "correct"


def latent_factor(vae) -> int:
    return 2 ** (len(vae.block_out_channels) - 1)


def pool_to_latent(maps: jax.Array, factor: int) -> jax.Array:
    """(B, H, W) -> (B, H/f, W/f) by averaging f x f blocks."""
    b, h, w = maps.shape
    return maps.reshape(b, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def upsample_nearest(maps: jax.Array, factor: int) -> jax.Array:
    return jnp.repeat(jnp.repeat(maps, factor, axis=1), factor, axis=2)


def _cfg_unet(model: EditModel, unet_params, z, image_latents, context, empty_context, t, text_scale,
              image_scale):
    """3-way classifier-free guidance as one UNet call on a 3B batch (text+image, image only, neither)."""
    zeros = jnp.zeros_like(image_latents)
    x = jnp.concatenate([jnp.concatenate([z, image_latents], -1), jnp.concatenate([z, image_latents], -1),
                         jnp.concatenate([z, zeros], -1)], 0)
    ctx = jnp.concatenate([context, empty_context, empty_context], 0)
    eps = model.unet.apply({"params": unet_params}, x, jnp.broadcast_to(t, (x.shape[0],)), ctx)
    eps = eps.astype(jnp.float32)
    e_ti, e_i, e_0 = jnp.split(eps, 3, axis=0)
    return e_0 + text_scale * (e_ti - e_i) + image_scale * (e_i - e_0)


def edit_batch(model: EditModel, params: dict, images: jax.Array, input_ids: jax.Array, empty_ids: jax.Array,
               priors: jax.Array, seeds: jax.Array, tau: jax.Array, text_scale: jax.Array,
               image_scale: jax.Array, noise_level: jax.Array, renoise_paper: jax.Array, *, num_steps: int,
               relevance_draws: int = 1) -> dict:
    """Edit a batch. images, priors: (B, H, W) in [-1, 1] / [0, 1]; input_ids (B, 77); seeds (B,) uint32.

    Returns a dict of arrays: edited (B, H, W), guidance (B, h, w) = G, relevance (B, h, w) = R,
    mask (B, H, W) bool (pixel), latent_mask (B, h, w) bool, latents (B, h, w, c) final latents,
    start_latents (B, h, w, c): the source latent noised to the first timestep (the loop's start).
    """
    vae, f = model.vae, latent_factor(model.vae)
    compute = jnp.float32
    keys = jax.vmap(jax.random.key)(seeds)
    split = jax.vmap(lambda k: jax.random.split(k, 2 + relevance_draws))(keys)  # (B, 2 + K) keys

    mean, logvar = vae.apply({"params": params["vae"]}, to_vae_channels(images, vae.in_channels),
                             method=vae.encode)
    post_noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(split[:, 0])
    z_src = (mean + jnp.exp(0.5 * logvar) * post_noise) * vae.scaling_factor
    image_latents = mean  # IP2P conditions on the unscaled posterior mode
    noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(split[:, 1])

    text = functools.partial(model.text_encoder.apply, {"params": params["text_encoder"]})
    context = text(input_ids)[0].astype(compute)
    empty_context = jnp.broadcast_to(text(empty_ids[None])[0].astype(compute), context.shape)

    # Relevance map: |eps(z_t, I, T) - eps(z_t, I, empty)| at t = noise_level * T, averaged over K draws.
    T = model.schedule.num_train_timesteps
    t_rel = jnp.clip(jnp.round(noise_level * T), 0, T - 1).astype(jnp.int32)

    def one_relevance(k_col):
        n = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(k_col)
        z_t = add_noise(model.schedule, z_src, n, jnp.full((z_src.shape[0],), t_rel))
        x = jnp.concatenate([jnp.concatenate([z_t, image_latents], -1)] * 2, 0)
        eps = model.unet.apply({"params": params["unet"]}, x, jnp.full((x.shape[0],), t_rel),
                               jnp.concatenate([context, empty_context], 0))
        e_ti, e_i = jnp.split(eps, 2, axis=0)
        return relevance_from_eps(e_ti, e_i)

    relevance = jnp.mean(jnp.stack([one_relevance(split[:, 2 + k]) for k in range(relevance_draws)]), 0)
    guidance = pool_to_latent(priors, f) * relevance
    latent_mask = guidance >= tau
    pixel_mask = upsample_nearest(latent_mask, f)

    timesteps = jnp.asarray(ddim_timesteps(model.scheduler_config, num_steps), jnp.int32)
    prev_timesteps = jnp.asarray(ddim_prev_timesteps(model.scheduler_config, num_steps), jnp.int32)
    b = z_src.shape[0]

    def background(t):  # the source latent at timestep t (t < 0: the clean latent)
        noised = add_noise(model.schedule, z_src, noise, jnp.full((b,), jnp.maximum(t, 0)))
        return jnp.where(t < 0, z_src, noised)

    start = add_noise(model.schedule, z_src, noise, jnp.full((b,), timesteps[0]))
    z = start
    m = latent_mask[..., None].astype(compute)

    def body(i, z):
        t, t_prev = timesteps[i], prev_timesteps[i]
        eps = _cfg_unet(model, params["unet"], z, image_latents, context, empty_context, t, text_scale,
                        image_scale)
        z = ddim_step(model.schedule, eps, t, t_prev, z)
        return m * z + (1.0 - m) * background(jnp.where(renoise_paper, t, t_prev))

    z = jax.lax.fori_loop(0, num_steps, body, z)
    decoded = vae.apply({"params": params["vae"]}, z / vae.scaling_factor, method=vae.decode)
    decoded = jnp.clip(jnp.mean(decoded.astype(jnp.float32), axis=-1), -1.0, 1.0)
    edited = jnp.where(pixel_mask, decoded, images)
    return {"edited": edited, "decoded": decoded, "guidance": guidance, "relevance": relevance,
            "mask": pixel_mask, "latent_mask": latent_mask, "latents": z, "start_latents": start}


def compile_edit(model: EditModel, num_steps: int, relevance_draws: int = 1):
    """The jitted edit program; call as fn(params, images, ids, empty_ids, priors, seeds, tau, s_T, s_I,
    noise_level, renoise_paper)."""
    fn = functools.partial(edit_batch, model, num_steps=num_steps, relevance_draws=relevance_draws)
    return jax.jit(fn)


def scalar_args(p: EditParams) -> tuple:
    """EditParams -> the traced scalar arguments of the edit program."""
    return (np.float32(p.tau), np.float32(p.text_scale), np.float32(p.image_scale), np.float32(p.noise_level),
            np.bool_(p.renoise == "paper"))
