"""The discrete noise schedule shared by training (`add_noise`) and sampling (`ddim.py`).

Built from a diffusers scheduler config dict (`scheduler/scheduler_config.json`). Keys that are missing take
`diffusers.DDIMScheduler`'s defaults, so `noise_schedule(cfg)` means what `DDIMScheduler.from_config(cfg)` means.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax.numpy as jnp
import numpy as np

from x2x_jax.errors import ConfigError

# DDIMScheduler.__init__ defaults (diffusers 0.42), used for keys a config leaves out.
DDIM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@flax.struct.dataclass
class NoiseSchedule:
    """Per-timestep coefficients (float32 arrays of length `num_train_timesteps`) plus static settings.

    A pytree: the arrays are leaves (pass it straight into jitted functions), the rest is static metadata.
    """

    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    final_alpha_cumprod: jnp.ndarray  # scalar: ᾱ used for the step after t=0 (DDIM's `set_alpha_to_one`)
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    clip_sample_range: float | None = flax.struct.field(pytree_node=False, default=None)  # None: no clipping


def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with DDIMScheduler defaults filled in and every value we rely on checked."""
    cfg = dict(DDIM_DEFAULTS)
    cfg.update({k: v for k, v in config.items() if k in DDIM_DEFAULTS})

    def bad(key: str, allowed: str) -> ConfigError:
        return ConfigError(f"scheduler config: {key}={cfg[key]!r} is not supported (supported: {allowed})")

    n = cfg["num_train_timesteps"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise bad("num_train_timesteps", "an integer >= 2")
    if cfg["trained_betas"] is None and cfg["beta_schedule"] not in BETA_SCHEDULES:
        raise bad("beta_schedule", ", ".join(BETA_SCHEDULES))
    if cfg["trained_betas"] is not None and len(cfg["trained_betas"]) != n:
        raise ConfigError(
            f"scheduler config: trained_betas has {len(cfg['trained_betas'])} values, "
            f"num_train_timesteps is {n}"
        )
    if cfg["prediction_type"] not in PREDICTION_TYPES:
        raise bad("prediction_type", ", ".join(PREDICTION_TYPES))
    if cfg["timestep_spacing"] not in TIMESTEP_SPACINGS:
        raise bad("timestep_spacing", ", ".join(TIMESTEP_SPACINGS))
    if cfg["thresholding"]:
        raise bad("thresholding", "false")
    if cfg["rescale_betas_zero_snr"]:
        raise bad("rescale_betas_zero_snr", "false")
    if not isinstance(cfg["steps_offset"], int) or cfg["steps_offset"] < 0:
        raise bad("steps_offset", "an integer >= 0")
    return cfg


def _betas(cfg: Mapping[str, Any]) -> np.ndarray:
    n = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        return np.asarray(cfg["trained_betas"], np.float32)
    if cfg["beta_schedule"] == "linear":
        return np.linspace(cfg["beta_start"], cfg["beta_end"], n).astype(np.float32)
    # scaled_linear: diffusers squares the float32 linspace of the square roots. Its torch.linspace rounds a
    # few entries one ulp differently from this correctly rounded one; the effect on ᾱ stays below 1e-7.
    root = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n).astype(np.float32)
    return root * root


def noise_schedule(config: Mapping[str, Any]) -> NoiseSchedule:
    """The schedule described by a diffusers scheduler config dict (unknown keys are ignored)."""
    cfg = resolve_config(config)
    betas = _betas(cfg)
    alphas = np.float32(1.0) - betas
    # torch.cumprod on CPU accumulates float32 in float64; doing the same keeps ᾱ within 1e-7 of diffusers.
    alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    final = np.float32(1.0) if cfg["set_alpha_to_one"] else alphas_cumprod[0]
    return NoiseSchedule(
        betas=jnp.asarray(betas),
        alphas_cumprod=jnp.asarray(alphas_cumprod),
        final_alpha_cumprod=jnp.asarray(final, jnp.float32),
        num_train_timesteps=cfg["num_train_timesteps"],
        prediction_type=cfg["prediction_type"],
        clip_sample_range=float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None,
    )


def _per_sample(coef: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """(B,) or () coefficients -> broadcastable against a (B, ...) array of rank `ndim`."""
    coef = jnp.ravel(coef)
    return coef.reshape(coef.shape + (1,) * (ndim - 1))


def add_noise(schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """Forward diffusion q(x_t | x_0) = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε; `t` is an int scalar or (B,)."""
    a = schedule.alphas_cumprod.astype(x0.dtype)[t]
    return _per_sample(a**0.5, x0.ndim) * x0 + _per_sample((1 - a) ** 0.5, x0.ndim) * noise


def velocity(schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """The v-prediction target sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x0 (diffusers' `get_velocity`)."""
    a = schedule.alphas_cumprod.astype(x0.dtype)[t]
    return _per_sample(a**0.5, x0.ndim) * noise - _per_sample((1 - a) ** 0.5, x0.ndim) * x0
