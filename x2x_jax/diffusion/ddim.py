"""Deterministic DDIM sampling (η = 0) with the semantics of `diffusers.DDIMScheduler`.

`ddim_timesteps` / `ddim_prev_timesteps` run once in numpy (the step count is static); `ddim_step` is a pure jnp
function of traced arrays, meant to sit inside `lax.fori_loop` / `lax.scan`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from x2x_jax.diffusion.schedule import NoiseSchedule, _per_sample, resolve_config
from x2x_jax.errors import ConfigError
from x2x_jax.models.configs import DIFFUSERS_VERSION

# The diffusers release our scheduler folders are written for (and tested against).


def ddim_timesteps(schedule_config: Mapping[str, Any], num_inference_steps: int) -> np.ndarray:
    """Descending int64 timesteps, equal to `DDIMScheduler.from_config(cfg).set_timesteps(n)`'s."""
    cfg = resolve_config(schedule_config)
    T, n = cfg["num_train_timesteps"], num_inference_steps
    if not 1 <= n <= T:
        raise ConfigError(f"num_inference_steps={n} must be between 1 and num_train_timesteps={T}")
    spacing = cfg["timestep_spacing"]
    if spacing == "leading":
        ts = np.arange(n)[::-1] * (T // n) + cfg["steps_offset"]
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    else:  # linspace
        ts = np.linspace(0, T - 1, n).round()[::-1]
    return np.ascontiguousarray(ts, dtype=np.int64)


def ddim_prev_timesteps(schedule_config: Mapping[str, Any], num_inference_steps: int) -> np.ndarray:
    """The `t_prev` DDIMScheduler.step pairs with each timestep: t - T // n (negative means "after t=0").

    diffusers uses this rule for every spacing, "trailing" and "linspace" included; so do we.
    """
    T = resolve_config(schedule_config)["num_train_timesteps"]
    return ddim_timesteps(schedule_config, num_inference_steps) - T // num_inference_steps


def predict_x0_eps(
    schedule: NoiseSchedule, model_output: jnp.ndarray, t: jnp.ndarray, sample: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(x̂0, ε̂) from the model's output at timestep `t` (int scalar or (B,)), per `schedule.prediction_type`.

    x̂0 is clipped when the config asked for `clip_sample`; ε̂ is not re-derived from the clipped x̂0
    (diffusers' default `use_clipped_model_output=False`).
    """
    a_t = _per_sample(schedule.alphas_cumprod[t], sample.ndim)
    sqrt_a, sqrt_b = a_t**0.5, (1 - a_t) ** 0.5
    if schedule.prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_b * eps) / sqrt_a
    elif schedule.prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_b * model_output
        eps = sqrt_a * model_output + sqrt_b * sample
    else:  # "sample"
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_b
    if schedule.clip_sample_range is not None:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return x0, eps


def ddim_step(
    schedule: NoiseSchedule,
    eps: jnp.ndarray,
    t: jnp.ndarray,
    t_prev: jnp.ndarray,
    sample: jnp.ndarray,
) -> jnp.ndarray:
    """One η = 0 DDIM update x_t -> x_{t_prev}, as `DDIMScheduler.step(eps, t, sample).prev_sample`.

    `eps` is the model output (ε, v or x0 per `schedule.prediction_type`). `t`, `t_prev`: int scalars or (B,),
    traced or not. When `t_prev < 0`, ᾱ_prev is `schedule.final_alpha_cumprod`. Coefficients are float32; the
    result has `sample`'s dtype.
    """
    x0, pred_eps = predict_x0_eps(schedule, eps, t, sample)
    t_prev = jnp.asarray(t_prev)
    a_prev = jnp.where(
        t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], schedule.final_alpha_cumprod
    )
    a_prev = _per_sample(a_prev, sample.ndim)
    prev = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * pred_eps
    return prev.astype(sample.dtype)


def scheduler_config(
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    prediction_type: str = "epsilon",
    steps_offset: int = 1,
    set_alpha_to_one: bool = False,
    clip_sample: bool = False,
    timestep_spacing: str = "leading",
) -> dict[str, Any]:
    """A `scheduler/scheduler_config.json` dict for `DDIMScheduler.from_config`; defaults are SD-v1-4's.

    Every key is written out, so the file means the same to DDIMScheduler and to PNDM-style readers
    (`skip_prk_steps`), whatever their own defaults are.
    """
    cfg: dict[str, Any] = {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": num_train_timesteps,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "beta_schedule": beta_schedule,
        "trained_betas": None,
        "prediction_type": prediction_type,
        "steps_offset": steps_offset,
        "set_alpha_to_one": set_alpha_to_one,
        "clip_sample": clip_sample,
        "clip_sample_range": 1.0,
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": timestep_spacing,
        "rescale_betas_zero_snr": False,
        "skip_prk_steps": True,
    }
    resolve_config(cfg)  # refuse to write something we could not read back
    return cfg
