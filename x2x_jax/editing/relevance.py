"""The relevance map of Region-Specific Editing.

R = sum over latent channels of |eps(z_t, I, T) - eps(z_t, I, empty)| at t = noise_level * T, clipped at
Q3 + 1.5 * IQR (midpoint percentiles, per image) and min-max normalised to [0, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
