"""The RSE edit program: parity with diffusers' IP2P pipeline at tau = 0, both re-noise modes against a NumPy
reference of the blending loop, the relevance map through the program, the pixel composite, determinism, and one
compilation for any traced value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.oracle import torch_models, write_torch_pipeline
from x2x_jax.convert import diffusers as bridge
from x2x_jax.diffusion.schedule import noise_schedule
from x2x_jax.editing.rse import EditModel, EditParams, compile_edit, sample_noise
from x2x_jax.models.tokenizer import tokenize

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
    """The edit program's last argument (one EditParams pytree), as a 1-tuple to splat."""
    return (EditParams(tau, s_t, s_i, noise, paper).check().traced(),)


# --- plain NumPy references (float64) ------------------------------------------------------------------------


def np_alphas_cumprod(cfg):
    assert cfg["beta_schedule"] == "scaled_linear"
    betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"]) ** 2
    return np.cumprod(1.0 - betas)


def np_ddim_pairs(cfg, steps):
    """(t, t_prev) of DDIM with "leading" spacing, written out from the diffusers scheduler's definition."""
    assert cfg["timestep_spacing"] == "leading"
    T = cfg["num_train_timesteps"]
    ts = np.arange(steps)[::-1] * (T // steps) + cfg["steps_offset"]
    return [(int(t), int(t) - T // steps) for t in ts]


def np_relevance(raw):
    """Per image: clip at Q3 + 1.5 IQR (midpoint percentiles), min-max normalise."""
    out = []
    for m in raw:
        q1, q3 = np.percentile(m, [25, 75], method="midpoint")
        m = np.minimum(m, q3 + 1.5 * (q3 - q1))
        out.append((m - m.min()) / (m.max() - m.min()))
    return np.stack(out)


def encode(model, params, images, ids, empty):
    mean, logvar = model.vae.apply({"params": params["vae"]}, jnp.asarray(images)[..., None].repeat(3, -1),
                                   method=model.vae.encode)
    ctx = model.text_encoder.apply({"params": params["text_encoder"]}, jnp.asarray(ids))[0]
    ectx = model.text_encoder.apply({"params": params["text_encoder"]}, jnp.asarray(empty)[None])[0]
    return np.asarray(mean, np.float64), np.asarray(logvar, np.float64), ctx, jnp.broadcast_to(ectx, ctx.shape)


def unet_fn(model, params):
    return jax.jit(lambda x, t, c: model.unet.apply({"params": params["unet"]}, x, t, c))


# --- tests ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
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
    np.testing.assert_array_equal(np.asarray(ours["edited"]), np.asarray(ours["decoded"]))

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"

    rgb = np.repeat(((images[0] + 1) / 2)[..., None], 3, axis=-1)
    start = torch.from_numpy(np.asarray(ours["start_latents"]).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        theirs = pipe(text, image=rgb, num_inference_steps=steps, guidance_scale=7.5, image_guidance_scale=1.5,
                      latents=start, output_type="latent").images
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(ours["latents"])
    rel = np.max(np.abs(got - theirs)) / np.max(np.abs(theirs))
    print(f"tau=0 final latents vs diffusers IP2P: max |diff| / max |theirs| = {rel:.3g}")
    assert rel <= 1e-4, rel
    assert np.max(np.abs(got - np.asarray(ours["start_latents"]))) > 100 * np.max(np.abs(got - theirs))


@pytest.mark.slow
def test_both_renoise_modes_match_a_numpy_reference_of_the_blending_loop(loaded):
    model, params, tok = loaded
    cfg, steps, seed, s_t, s_i, tau = model.scheduler_config, 4, 3, 7.5, 1.5, 0.05
    images, ids, empty = inputs(tok, ["Add the finding of edema."], seed=1)
    prior = np.zeros_like(images)
    prior[:, :, : RES // 2] = 1.0  # the mask can only cover the image's left half
    edit = compile_edit(model, steps)
    outs = {paper: edit(params, images, ids, empty, prior, np.uint32([seed]), *scalars(tau=tau, paper=paper))
            for paper in (False, True)}
    assert set(edit.cache_sizes().values()) == {1}

    # The reference: the masked DDIM loop written plainly in NumPy (float64), sharing only the networks and the
    # noise draws with the program. The background is re-noised with the start noise to t_prev (correct) or to
    # the step's own t (the original code, one step behind).
    a = np_alphas_cumprod(cfg)
    a_final = 1.0 if cfg["set_alpha_to_one"] else a[0]
    mean, logvar, ctx, ectx = encode(model, params, images, ids, empty)
    noise = jax.tree.map(lambda x: np.asarray(x, np.float64), sample_noise(np.uint32([seed]), mean.shape[1:], 1))
    z_src = (mean + np.exp(0.5 * logvar) * noise["posterior"]) * model.vae.scaling_factor
    unet = unet_fn(model, params)

    def noised(t):
        return z_src if t < 0 else np.sqrt(a[t]) * z_src + np.sqrt(1 - a[t]) * noise["start"]

    pairs = np_ddim_pairs(cfg, steps)
    for paper, out in outs.items():
        mask = np.asarray(out["latent_mask"])[..., None]
        assert 0 < mask.mean() < 1 and not mask[:, :, RES // 4:].any()
        z = noised(pairs[0][0])
        np.testing.assert_allclose(np.asarray(out["start_latents"]), z, atol=1e-5)
        for t, t_prev in pairs:
            x = np.concatenate([np.concatenate([z, mean], -1), np.concatenate([z, mean], -1),
                                np.concatenate([z, np.zeros_like(mean)], -1)])
            eps = np.asarray(unet(jnp.asarray(x, jnp.float32), jnp.full((3,), t), jnp.concatenate([ctx, ectx, ectx])),
                             np.float64)
            e_ti, e_i, e_0 = np.split(eps, 3)
            e = e_0 + s_t * (e_ti - e_i) + s_i * (e_i - e_0)
            x0 = (z - np.sqrt(1 - a[t]) * e) / np.sqrt(a[t])
            a_prev = a[t_prev] if t_prev >= 0 else a_final
            z = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e
            z = np.where(mask, z, noised(t if paper else t_prev))
        got = np.asarray(out["latents"])
        np.testing.assert_allclose(got, z, atol=1e-4 * np.abs(z).max(), rtol=1e-4)
        if not paper:  # the last step put the clean source latent back outside the mask
            np.testing.assert_allclose(got[~mask[..., 0]], z_src[~mask[..., 0]], atol=1e-5)
    assert not np.allclose(np.asarray(outs[True]["latents"]), np.asarray(outs[False]["latents"]), atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("draws", [1, 2])
def test_relevance_and_guidance_through_the_program_match_numpy(loaded, draws):
    model, params, tok = loaded
    seeds, noise_level = np.uint32([11, 12]), 0.6
    images, ids, empty = inputs(tok, ["Add the finding of edema.", "Remove the finding of pneumothorax."], seed=5)
    prior = np.random.default_rng(0).uniform(0, 1, images.shape).astype(np.float32)
    out = compile_edit(model, 1, relevance_draws=draws)(params, images, ids, empty, prior, seeds,
                                                        *scalars(tau=0.3, noise=noise_level))

    a = np_alphas_cumprod(model.scheduler_config)
    t = int(round(noise_level * model.scheduler_config["num_train_timesteps"]))
    mean, logvar, ctx, ectx = encode(model, params, images, ids, empty)
    noise = jax.tree.map(lambda x: np.asarray(x, np.float64), sample_noise(seeds, mean.shape[1:], draws))
    z_src = (mean + np.exp(0.5 * logvar) * noise["posterior"]) * model.vae.scaling_factor
    unet, raw = unet_fn(model, params), 0.0
    for n in noise["relevance"]:
        z_t = jnp.asarray(np.sqrt(a[t]) * z_src + np.sqrt(1 - a[t]) * n, jnp.float32)
        e_ti = unet(jnp.concatenate([z_t, jnp.asarray(mean, jnp.float32)], -1), jnp.full((2,), t), ctx)
        e_i = unet(jnp.concatenate([z_t, jnp.asarray(mean, jnp.float32)], -1), jnp.full((2,), t), ectx)
        raw = raw + np.abs(np.asarray(e_ti, np.float64) - np.asarray(e_i, np.float64)).sum(-1) / draws
    relevance = np_relevance(raw)
    np.testing.assert_allclose(np.asarray(out["relevance"]), relevance, atol=1e-4)
    pooled = prior.reshape(2, RES // 2, 2, RES // 2, 2).mean(axis=(2, 4))  # the tiny VAE downsamples by 2
    np.testing.assert_allclose(np.asarray(out["guidance"]), pooled * relevance, atol=1e-4)
    # Latent and pixel masks are the same map at two resolutions.
    np.testing.assert_array_equal(np.asarray(out["mask"])[:, ::2, ::2], np.asarray(out["latent_mask"]))
    np.testing.assert_array_equal(np.asarray(out["latent_mask"]), np.asarray(out["guidance"]) >= np.float32(0.3))


@pytest.mark.slow
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
    np.testing.assert_array_equal(np.asarray(out["edited"])[mask], np.asarray(out["decoded"])[mask])
    assert not np.allclose(np.asarray(out["edited"])[mask], images[mask], atol=1e-3)
    assert np.all(np.asarray(out["guidance"]) >= 0) and np.all(np.asarray(out["guidance"]) <= 1)


@pytest.mark.slow
def test_same_seed_same_result_other_seed_other_result(loaded):
    model, params, tok = loaded
    images, ids, empty = inputs(tok, ["Add the finding of edema."], seed=4)
    edit = compile_edit(model, 2)
    a = edit(params, images, ids, empty, np.ones_like(images), np.uint32([5]), *scalars())
    b = edit(params, images, ids, empty, np.ones_like(images), np.uint32([5]), *scalars())
    c = edit(params, images, ids, empty, np.ones_like(images), np.uint32([6]), *scalars())
    np.testing.assert_array_equal(np.asarray(a["edited"]), np.asarray(b["edited"]))
    assert not np.array_equal(np.asarray(a["latents"]), np.asarray(c["latents"]))


def assert_one_compilation_over_five_edits(edit, params, tok, caplog, seed: int):
    """5 edits changing image, instruction, prior, seed, tau, scales, noise level and re-noise mode: 1 compile."""
    texts = ["Add the finding of edema.", "Remove the finding of pleural effusion.", "Add the finding of edema.",
             "Change the level of edema from mild to severe.", "Add the finding of pneumothorax."]
    values = [scalars(), scalars(), scalars(), scalars(tau=0.5), scalars(s_t=3.0, s_i=1.1, noise=0.6, paper=True)]
    prior = np.ones((1, RES, RES), np.float32)
    with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
        for i, (text, sc) in enumerate(zip(texts, values)):
            images, ids, empty = inputs(tok, [text], seed=seed + i)  # new image, instruction ...
            prior = prior * 0.9
            out = edit(params, images, ids, empty, prior, np.uint32([10 * seed + i]), *sc)  # ... prior and seed
            jax.block_until_ready(out)
    assert edit.cache_sizes() == {"prepare": 1, "denoise": 1, "finish": 1}
    for stage in ("prepare_stage", "denoise_stage", "finish_stage"):
        compiles = [r for r in caplog.records if "Compiling" in r.getMessage() and stage in r.getMessage()]
        assert len(compiles) == 1, [r.getMessage()[:120] for r in compiles]


@pytest.mark.slow
def test_no_recompilation_when_traced_values_change(loaded, caplog):
    model, params, tok = loaded
    assert_one_compilation_over_five_edits(compile_edit(model, 2), params, tok, caplog, seed=10)


# --- learned guidance (x2x_jax/models/guidance.py) ------------------------------------------------------------


@pytest.fixture(scope="module")
def learned(loaded):
    import dataclasses

    from x2x_jax.models.guidance import GuidancePredictor, init_params

    model, params, tok = loaded
    predictor = GuidancePredictor(latent_channels=4, cross_attention_dim=32, block_out_channels=(8, 16),
                                  attention_heads=2)
    p = init_params(predictor, jax.random.key(0), (RES // 2, RES // 2))
    return dataclasses.replace(model, guidance=predictor), {**params, "guidance": p}, tok


@pytest.mark.slow
def test_learned_guidance_is_prior_times_the_predictor_and_skips_the_relevance_passes(learned, monkeypatch):
    from x2x_jax.editing import relevance

    model, params, tok = learned
    images, ids, empty = inputs(tok, ["Add the finding of edema.", "Remove the finding of pneumothorax."], seed=6)
    prior = np.random.default_rng(1).uniform(0, 1, images.shape).astype(np.float32)

    def no_relevance(*a, **k):
        raise AssertionError("the relevance UNet passes are traced with learned guidance")

    monkeypatch.setattr(relevance, "relevance_map", no_relevance)
    edit = compile_edit(model, 1, guidance="learned")
    a = edit(params, images, ids, empty, prior, np.uint32([1, 2]), *scalars(tau=0.3))
    b = edit(params, images, ids, empty, prior, np.uint32([8, 9]), *scalars(tau=0.3))
    mean, _, ctx, _ = encode(model, params, images, ids, empty)
    p = np.asarray(model.guidance.apply({"params": params["guidance"]}, jnp.asarray(mean, jnp.float32), ctx))
    pooled = prior.reshape(2, RES // 2, 2, RES // 2, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(a["relevance"]), p, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a["guidance"]), pooled * p, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a["latent_mask"]), np.asarray(a["guidance"]) >= np.float32(0.3))
    np.testing.assert_array_equal(np.asarray(a["guidance"]), np.asarray(b["guidance"]))  # G ignores the seed


def test_learned_guidance_outside_the_mask_the_output_is_the_input_exactly(learned):
    model, params, tok = learned
    images, ids, empty = inputs(tok, ["Add the finding of pneumothorax."] * 2, seed=2)
    prior = np.zeros_like(images)
    prior[:, RES // 4:, :] = 1.0
    out = compile_edit(model, 3, guidance="learned")(params, images, ids, empty, prior, np.uint32([1, 2]),
                                                     *scalars(tau=0.2))
    mask = np.asarray(out["mask"])
    assert mask.any() and (~mask).any() and not mask[:, : RES // 4].any()
    np.testing.assert_array_equal(np.asarray(out["edited"])[~mask], images[~mask])
    np.testing.assert_array_equal(np.asarray(out["edited"])[mask], np.asarray(out["decoded"])[mask])


def test_learned_guidance_no_recompilation_when_traced_values_change(learned, caplog):
    model, params, tok = learned
    assert_one_compilation_over_five_edits(compile_edit(model, 2, guidance="learned"), params, tok, caplog, seed=20)


def test_learned_guidance_without_a_predictor_is_refused(loaded):
    model, _, _ = loaded
    with pytest.raises(ValueError, match="GuidancePredictor"):
        compile_edit(model, 1, guidance="learned")
    with pytest.raises(ValueError, match="guidance must be one of"):
        compile_edit(model, 1, guidance="attention")
