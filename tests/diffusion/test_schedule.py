import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2x_jax.diffusion.schedule import add_noise, noise_schedule, velocity
from x2x_jax.errors import ConfigError

SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

CONFIGS = [
    SD_CONFIG,
    {**SD_CONFIG, "set_alpha_to_one": True},
    {"beta_schedule": "linear"},  # DDIMScheduler defaults otherwise
    {"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 37},
]


@pytest.mark.oracle
@pytest.mark.parametrize("cfg", CONFIGS)
def test_alphas_cumprod_match_diffusers(cfg):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler.from_config(cfg)
    s = noise_schedule(cfg)
    assert s.num_train_timesteps == ref.config.num_train_timesteps
    assert s.alphas_cumprod.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(s.betas), ref.betas.numpy(), rtol=0, atol=1e-8)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(float(s.final_alpha_cumprod), float(ref.final_alpha_cumprod), rtol=0, atol=1e-7)


@pytest.mark.oracle
def test_add_noise_and_velocity_match_diffusers():
    import torch
    from diffusers import DDIMScheduler

    ref = DDIMScheduler.from_config(SD_CONFIG)
    s = noise_schedule(SD_CONFIG)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 5, 2)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 5, 2)).astype(np.float32)
    t = np.array([0, 517, 999])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    got = np.asarray(jax.jit(add_noise)(s, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(np.asarray(velocity(s, x0, noise, t)), want_v, rtol=1e-6, atol=1e-6)


def test_add_noise_scalar_t_and_endpoints():
    s = noise_schedule(SD_CONFIG)
    x0 = jnp.full((2, 3), 2.0)
    noise = jnp.full((2, 3), -1.0)
    a = float(s.alphas_cumprod[10])
    np.testing.assert_allclose(add_noise(s, x0, noise, 10), 2 * a**0.5 - (1 - a) ** 0.5, rtol=1e-6)
    # ᾱ decreases monotonically: late timesteps are mostly noise.
    assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)
    assert float(s.alphas_cumprod[-1]) < 0.01 < 0.99 < float(s.alphas_cumprod[0])


@pytest.mark.parametrize(
    "key,value",
    [
        ("beta_schedule", "squaredcos_cap_v2"),
        ("prediction_type", "flow"),
        ("timestep_spacing", "karras"),
        ("thresholding", True),
        ("rescale_betas_zero_snr", True),
        ("num_train_timesteps", 1.5),
    ],
)
def test_unsupported_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        noise_schedule({**SD_CONFIG, key: value})


def test_schedule_is_a_pytree_with_static_settings():
    s = noise_schedule({**SD_CONFIG, "prediction_type": "v_prediction"})
    leaves, treedef = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 3
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.prediction_type == "v_prediction" and back.num_train_timesteps == 1000
