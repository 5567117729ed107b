"""The relevance map of Region-Specific Editing.

R = sum over latent channels of |eps(z_t, I, T) - eps(z_t, I, empty)| at t = noise_level * T, clipped at
Q3 + 1.5 * IQR (midpoint percentiles, per image) and min-max normalised to [0, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from x2x_jax.diffusion.schedule import NoiseSchedule, add_noise


def clip_and_normalize(raw: jax.Array) -> jax.Array:
    """(B, h, w) non-negative maps -> IQR-clipped, min-max normalised maps in [0, 1] (per image)."""

    def one(m):
        q1, q3 = jnp.percentile(m, jnp.array([25.0, 75.0]), method="midpoint")
        m = jnp.minimum(m, q3 + 1.5 * (q3 - q1))
        lo, hi = jnp.min(m), jnp.max(m)
        # A constant map (e.g. an untrained model) has no relevant region: return zeros, not NaN.
        return jnp.where(hi > lo, (m - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0)

    return jax.vmap(one)(raw)


def relevance_from_eps(eps_text_image: jax.Array, eps_image: jax.Array) -> jax.Array:
    """NHWC noise predictions with and without the instruction -> (B, h, w) relevance in [0, 1]."""
    raw = jnp.sum(jnp.abs(eps_text_image.astype(jnp.float32) - eps_image.astype(jnp.float32)), axis=-1)
    return clip_and_normalize(raw)


def raw_relevance(unet, unet_params, schedule: NoiseSchedule, z_src: jax.Array, image_latents: jax.Array,
                  context: jax.Array, empty_context: jax.Array, t_rel: jax.Array, noises: jax.Array) -> jax.Array:
    """The unnormalised map sum_c |eps(z_t, I, T) - eps(z_t, I, empty)| averaged over the K draws in `noises`
    (K, B, h, w, c), z_t = z_src noised to t_rel -> (B, h, w). One UNet call on a 2B batch per draw."""
    b = z_src.shape[0]
    ctx = jnp.concatenate([context, empty_context], 0)
    cond = jnp.concatenate([image_latents, image_latents], 0)
    t = jnp.full((2 * b,), t_rel)

    def raw(noise):
        z_t = add_noise(schedule, z_src, noise, t[:b])
        x = jnp.concatenate([jnp.concatenate([z_t, z_t], 0), cond], -1)
        e_ti, e_i = jnp.split(unet.apply({"params": unet_params}, x, t, ctx).astype(jnp.float32), 2, 0)
        return jnp.sum(jnp.abs(e_ti - e_i), axis=-1)

    # lax.map keeps one UNet in the graph whatever K is.
    return jnp.mean(jax.lax.map(raw, noises), axis=0)


def relevance_map(unet, unet_params, schedule: NoiseSchedule, z_src: jax.Array, image_latents: jax.Array,
                  context: jax.Array, empty_context: jax.Array, t_rel: jax.Array, noises: jax.Array) -> jax.Array:
    """R of a batch: `raw_relevance`, then IQR-clipped and min-max normalised -> (B, h, w) in [0, 1]. Used by the
    edit program and the guidance stage's distillation target."""
    return clip_and_normalize(raw_relevance(unet, unet_params, schedule, z_src, image_latents, context,
                                            empty_context, t_rel, noises))
