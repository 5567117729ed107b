"""The RSE edit program: parity with diffusers' IP2P pipeline at tau = 0, the paper's re-noise, the pixel
composite, and one compilation for any traced value."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from tests.convert.test_diffusers_bridge import torch_models, write_torch_pipeline, tokenizer  # noqa: F401
from x2x_jax.convert import diffusers as bridge
from x2x_jax.convert.tokenizer import tokenize
from x2x_jax.diffusion.ddim import ddim_prev_timesteps, ddim_step, ddim_timesteps
from x2x_jax.diffusion.schedule import add_noise, noise_schedule
from x2x_jax.editing.rse import EditModel, compile_edit

RES = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):  # noqa: F811
    return write_torch_pipeline(tmp_path_factory.mktemp("pipe") / "ip2p", torch_models(seed=3), tokenizer)


@pytest.fixture(scope="module")
def loaded(model_dir, tokenizer):  # noqa: F811
    pipe = bridge.load_pipeline(model_dir)
    model = EditModel(pipe.unet, pipe.vae, pipe.text_encoder, noise_schedule(pipe.scheduler_config),
                      pipe.scheduler_config)
    params = {"unet": pipe.unet_params, "vae": pipe.vae_params, "text_encoder": pipe.text_params}
    return model, params, pipe.tokenizer


def inputs(tok, texts, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (len(texts), RES, RES)).astype(np.float32)
    ids, _ = tokenize(tok, texts)
    empty = tokenize(tok, [""])[0][0]
    return images, ids, empty


def scalars(tau=0.1, s_t=7.5, s_i=1.5, noise=0.8, paper=False):
    return np.float32(tau), np.float32(s_t), np.float32(s_i), np.float32(noise), np.bool_(paper)


@pytest.mark.oracle
def test_tau_zero_matches_diffusers_instruct_pix2pix(model_dir, loaded):
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    model, params, tok = loaded
    steps, text = 5, "Add the finding of pleural effusion."
    images, ids, empty = inputs(tok, [text])
    edit = compile_edit(model, steps)
    ours = edit(params, images, ids, empty, np.ones_like(images), np.uint32([7]), *scalars(tau=0.0))
    assert bool(np.all(np.asarray(ours["mask"])))

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    rgb = np.repeat(((images[0] + 1) / 2)[..., None], 3, axis=-1)
    start = torch.from_numpy(np.asarray(ours["start_latents"]).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        theirs = pipe(text, image=rgb, num_inference_steps=steps, guidance_scale=7.5, image_guidance_scale=1.5,
                      latents=start, output_type="latent").images
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(ours["latents"])
    rel = np.max(np.abs(got - theirs)) / np.max(np.abs(theirs))
    assert rel <= 1e-4, rel


def test_paper_renoise_matches_a_reference_of_the_original_blending(loaded):
    model, params, tok = loaded
    steps = 4
    images, ids, empty = inputs(tok, ["Add the finding of edema."], seed=1)
    prior = np.zeros_like(images)
    prior[:, :, : RES // 2] = 1.0  # the mask can only cover the image's left half
    edit = compile_edit(model, steps)
    ours = edit(params, images, ids, empty, prior, np.uint32([3]), *scalars(tau=0.05, paper=True))

    # Reference: the original loop, written plainly. It re-noises the background to the step's own t (one
    # step behind the latent), reusing the start noise; the start latent and mask come from the program.
    mask = np.asarray(ours["latent_mask"])[..., None].astype(np.float32)
    assert 0 < mask.mean() < 1
    start = jnp.asarray(ours["start_latents"])
    t0 = int(ddim_timesteps(model.scheduler_config, steps)[0])
    a0 = model.schedule.alphas_cumprod[t0]
    mean, _ = model.vae.apply({"params": params["vae"]}, jnp.asarray(images)[..., None].repeat(3, -1),
                              method=model.vae.encode)
    ctx = model.text_encoder.apply({"params": params["text_encoder"]}, jnp.asarray(ids))[0]
    ectx = model.text_encoder.apply({"params": params["text_encoder"]}, jnp.asarray(empty)[None])[0]
    # The source latent and the start noise, drawn from the seed as the program draws them:
    key = jax.random.split(jax.random.key(3), 3)
    _, logvar = model.vae.apply({"params": params["vae"]}, jnp.asarray(images)[..., None].repeat(3, -1),
                                method=model.vae.encode)
    z_src = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(key[0], mean.shape[1:])[None]) * \
        model.vae.scaling_factor
    noise = jax.random.normal(key[1], mean.shape[1:])[None]
    np.testing.assert_allclose(np.asarray(start), np.asarray(jnp.sqrt(a0) * z_src + jnp.sqrt(1 - a0) * noise),
                               atol=1e-5)
    z = start
    for t, t_prev in zip(ddim_timesteps(model.scheduler_config, steps),
                         ddim_prev_timesteps(model.scheduler_config, steps)):
        x = jnp.concatenate([jnp.concatenate([z, mean], -1), jnp.concatenate([z, mean], -1),
                             jnp.concatenate([z, jnp.zeros_like(mean)], -1)])
        eps = model.unet.apply({"params": params["unet"]}, x, jnp.full((3,), t),
                               jnp.concatenate([ctx, ectx, ectx]))
        e_ti, e_i, e_0 = jnp.split(eps, 3)
        z = ddim_step(model.schedule, e_0 + 7.5 * (e_ti - e_i) + 1.5 * (e_i - e_0), t, t_prev, z)
        z = mask * z + (1 - mask) * add_noise(model.schedule, z_src, noise, jnp.full((1,), t))
    np.testing.assert_allclose(np.asarray(ours["latents"]), np.asarray(z), atol=1e-4, rtol=1e-4)


def test_outside_the_mask_the_output_is_the_input_exactly(loaded):
    model, params, tok = loaded
    images, ids, empty = inputs(tok, ["Add the finding of pneumothorax."] * 2, seed=2)
    prior = np.zeros_like(images)
    prior[:, RES // 4:, :] = 1.0
    out = compile_edit(model, 3)(params, images, ids, empty, prior, np.uint32([1, 2]), *scalars(tau=0.2))
    mask = np.asarray(out["mask"])
    assert mask.any() and (~mask).any()
    assert not mask[:, : RES // 4].any()  # nothing outside the prior
    np.testing.assert_array_equal(np.asarray(out["edited"])[~mask], images[~mask])
    assert np.all(np.asarray(out["guidance"]) >= 0) and np.all(np.asarray(out["guidance"]) <= 1)


def test_same_seed_same_result_other_seed_other_result(loaded):
    model, params, tok = loaded
    images, ids, empty = inputs(tok, ["Add the finding of edema."], seed=4)
    edit = compile_edit(model, 2)
    a = edit(params, images, ids, empty, np.ones_like(images), np.uint32([5]), *scalars())
    b = edit(params, images, ids, empty, np.ones_like(images), np.uint32([5]), *scalars())
    c = edit(params, images, ids, empty, np.ones_like(images), np.uint32([6]), *scalars())
    np.testing.assert_array_equal(np.asarray(a["edited"]), np.asarray(b["edited"]))
    assert not np.array_equal(np.asarray(a["latents"]), np.asarray(c["latents"]))


def test_no_recompilation_when_traced_values_change(loaded):
    model, params, tok = loaded
    edit = compile_edit(model, 2)
    texts = ["Add the finding of edema.", "Remove the finding of pleural effusion.", "Add the finding of edema.",
             "Change the level of edema from mild to severe.", "Add the finding of pneumothorax."]
    values = [scalars(), scalars(), scalars(), scalars(tau=0.5), scalars(s_t=3.0, s_i=1.1, noise=0.6, paper=True)]
    for i, (text, sc) in enumerate(zip(texts, values)):
        images, ids, empty = inputs(tok, [text], seed=10 + i)  # new image, instruction ...
        out = edit(params, images, ids, empty, np.ones_like(images), np.uint32([100 + i]), *sc)  # ... and seed
        jax.block_until_ready(out)
    assert edit._cache_size() == 1
