import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2x_jax.diffusion.ddim import ddim_prev_timesteps, ddim_step, ddim_timesteps, scheduler_config
from x2x_jax.diffusion.schedule import noise_schedule
from x2x_jax.errors import ConfigError

SD = scheduler_config()


def fake_model(sample, t):
    # Deterministic stand-in for a UNet: depends on the sample and on t.
    return 0.1 * sample + 0.05 + 1e-4 * t


@pytest.mark.oracle
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [100, 50, 7])
def test_timesteps_match_diffusers(steps_offset, spacing, n):
    from diffusers import DDIMScheduler

    cfg = {**SD, "steps_offset": steps_offset, "timestep_spacing": spacing}
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(n)
    np.testing.assert_array_equal(ddim_timesteps(cfg, n), ref.timesteps.numpy())
    assert ddim_timesteps(cfg, n).dtype == np.int64
    np.testing.assert_array_equal(ddim_prev_timesteps(cfg, n), ref.timesteps.numpy() - 1000 // n)


def run_jax_loop(cfg, n, x):
    s = noise_schedule(cfg)
    ts, prevs = ddim_timesteps(cfg, n), ddim_prev_timesteps(cfg, n)

    @jax.jit
    def loop(x, ts, prevs):
        def body(i, x):
            return ddim_step(s, fake_model(x, ts[i]), ts[i], prevs[i], x)

        return jax.lax.fori_loop(0, n, body, x)

    return np.asarray(loop(jnp.asarray(x), jnp.asarray(ts), jnp.asarray(prevs)))


def run_torch_loop(cfg, n, x):
    import torch
    from diffusers import DDIMScheduler

    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(n)
    x = torch.from_numpy(x)
    for t in ref.timesteps:
        x = ref.step(fake_model(x, int(t)), t, x, eta=0.0).prev_sample
    return x.numpy()


@pytest.mark.oracle
@pytest.mark.parametrize(
    "overrides,n",
    [
        ({}, 100),
        ({"set_alpha_to_one": True}, 100),
        ({"steps_offset": 0, "set_alpha_to_one": True}, 50),
        ({"prediction_type": "v_prediction"}, 50),
        ({"prediction_type": "sample", "clip_sample": True}, 20),
        ({"beta_schedule": "linear", "timestep_spacing": "trailing"}, 30),
    ],
)
def test_ddim_loop_matches_diffusers(overrides, n):
    cfg = {**SD, **overrides}
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    want = run_torch_loop(cfg, n, x)
    got = run_jax_loop(cfg, n, x)
    scale = np.abs(want).max()
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, scale), np.abs(got - want).max()
    assert not np.allclose(want, x)  # the loop did something


def test_step_traced_t_and_final_alpha():
    cfg = {**SD, "set_alpha_to_one": True}
    s = noise_schedule(cfg)
    x = jnp.ones((1, 2, 2, 1))
    step = jax.jit(ddim_step)
    # Same traced program for several (t, t_prev); t_prev < 0 uses ᾱ_prev = final_alpha_cumprod = 1 → x0.
    out_last = step(s, 0.1 * x, jnp.int32(1), jnp.int32(-9), x)
    a = float(s.alphas_cumprod[1])
    np.testing.assert_allclose(out_last, (1 - (1 - a) ** 0.5 * 0.1) / a**0.5, rtol=1e-6)
    out_mid = step(s, 0.1 * x, jnp.int32(501), jnp.int32(491), x)
    assert step._cache_size() == 1
    a_t, a_p = float(s.alphas_cumprod[501]), float(s.alphas_cumprod[491])
    x0 = (1 - (1 - a_t) ** 0.5 * 0.1) / a_t**0.5
    np.testing.assert_allclose(out_mid, a_p**0.5 * x0 + (1 - a_p) ** 0.5 * 0.1, rtol=1e-6)


def test_per_sample_timesteps():
    s = noise_schedule(SD)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 3, 1)), jnp.float32)
    eps = 0.3 * x
    both = ddim_step(s, eps, jnp.array([901, 1]), jnp.array([881, -19]), x)
    first = ddim_step(s, eps[:1], 901, 881, x[:1])
    second = ddim_step(s, eps[1:], 1, -19, x[1:])
    np.testing.assert_allclose(both, jnp.concatenate([first, second]), rtol=1e-6)


@pytest.mark.oracle
def test_scheduler_config_loads_in_diffusers(tmp_path):
    from diffusers import DDIMScheduler

    cfg = scheduler_config()
    sched = DDIMScheduler.from_config(cfg)
    for key in ("steps_offset", "set_alpha_to_one", "clip_sample", "beta_schedule", "prediction_type"):
        assert sched.config[key] == cfg[key]
    sched.save_pretrained(tmp_path)
    again = DDIMScheduler.from_pretrained(tmp_path)
    assert again.config.steps_offset == 1 and again.config.beta_start == 0.00085


def test_scheduler_config_refuses_unsupported():
    with pytest.raises(ConfigError, match="beta_schedule"):
        scheduler_config(beta_schedule="cosine")
    with pytest.raises(ConfigError, match="num_inference_steps"):
        ddim_timesteps(SD, 1001)
