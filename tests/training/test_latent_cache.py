"""The UNet stage's offline latent cache: contents, refusals, and training from it = training from the images."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.training import tiny_run
from x2x_jax.data.pipeline import NO_AUGMENTATION, augment_example
from x2x_jax.errors import ConfigError
from x2x_jax.models.tokenizer import tokenize
from x2x_jax.models.vae import to_vae_channels
from x2x_jax.training import data, latent_cache, stages
from x2x_jax.training.components import build_components
from x2x_jax.training.loop import train
from x2x_jax.training.sharding import make_mesh
from x2x_jax.training.stages import unet as unet_stage
from x2x_jax.training.state import init_train_state
from x2x_jax.training.step import make_train_step


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latents")
    source = tiny_run.build_data(str(tmp / "data")).as_data_source(split="train")
    config = tiny_run.tiny_config(steps=2)
    config.data.latent_cache = str(tmp / "cache")
    config.data.rotation_deg, config.data.flip_p = 0.0, 0.0
    comps = build_components(config, jax.random.key(config.seed))
    build_config = config.copy_and_resolve_references()
    build_config.train.per_device_batch = 40 // jax.device_count()
    path = latent_cache.build(build_config, comps, make_mesh(-1, 1), source=source)
    return config, comps, source, path


def test_cache_holds_the_vae_outputs_of_the_unaugmented_pairs_and_their_token_ids(built):
    config, comps, source, path = built
    meta = json.loads((path / "meta.json").read_text())
    assert meta["num_examples"] == len(source) == 48 and meta["resolution"] == tiny_run.RES
    cache = latent_cache.CachedSource(path)
    vae = comps.vae
    for i in (0, 39, 40, 47):  # 40 + 8: the last batch was padded to 40
        ex = augment_example(source[i], np.random.default_rng(0), NO_AUGMENTATION)
        enc = lambda img: vae.apply({"params": comps.params["vae"]},  # noqa: E731
                                    to_vae_channels(jnp.asarray(img)[None], vae.in_channels), method=vae.encode)
        mean, logvar = enc(ex["current"])
        past, _ = enc(ex["past"])
        got = cache[i]
        np.testing.assert_allclose(got["current_mean"], mean[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["current_logvar"], logvar[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["past_latent"], past[0], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got["input_ids"], tokenize(comps.tokenizer, [ex["instruction"]])[0][0])


def test_refuses_to_overwrite_a_mismatched_vae_and_augmentation(built):
    config, comps, source, path = built
    before = sorted(p.name for p in path.iterdir())
    with pytest.raises(ConfigError, match="exists"):
        latent_cache.build(config, comps, make_mesh(-1, 1), source=source)
    assert sorted(p.name for p in path.iterdir()) == before
    assert latent_cache.check(config, comps.params["vae"])["num_examples"] == 48
    other = jax.tree.map(lambda x: x + 1e-3, comps.params["vae"])
    with pytest.raises(ConfigError, match="VAE"):
        latent_cache.check(config, other)
    augmented = config.copy_and_resolve_references()
    augmented.data.flip_p = 0.5
    with pytest.raises(ConfigError, match="un-augmented"):
        latent_cache.check(augmented, comps.params["vae"])
    missing = config.copy_and_resolve_references()
    missing.data.latent_cache = str(path.parent / "nothing_here")
    with pytest.raises(ConfigError, match="stage=latents"):
        latent_cache.check(missing, comps.params["vae"])


def _image_batches(config, comps, source, accum, micro):
    return data.batches(config, source, unet_stage.KEYS, 0, 1, accum, micro, tokenizer=comps.tokenizer)


def _cached_batches(config, accum, micro):
    return stages.for_config(config).build(config, make_mesh(-1, 1)).data(0, 1, accum, micro)


@pytest.mark.slow
def test_cached_batches_come_in_the_image_pipelines_order_and_resume(built):
    config, comps, source, path = built
    images = _image_batches(config, comps, source, 2, 4)
    cached = _cached_batches(config, 2, 4)
    for _ in range(3):
        a, b = next(images), next(cached)
        assert b["past_latent"].shape[:2] == (2, 4)
        np.testing.assert_array_equal(b["input_ids"], a["input_ids"])
    state = cached.get_state()
    want = next(cached)
    cached.set_state(state)
    np.testing.assert_array_equal(next(cached)["current_mean"], want["current_mean"])


@pytest.mark.slow
def test_a_step_from_the_cache_equals_a_step_from_the_images(built):
    config, comps, source, path = built
    objective = unet_stage.objective(config, comps)
    # Plain SGD with rate 1: the updated params differ by exactly the gradients' difference. (AdamW divides each
    # gradient by its own magnitude, so a parameter whose gradient is ~1e-9 — numerical noise that the two batch
    # layouts sum in a different order — moved by 0.16 vs 0.19 of the step on one machine: not a difference of the
    # two paths.)
    optimizer = optax.sgd(1.0)
    frozen = {k: v for k, v in comps.params.items() if k != "unet"}
    step = jax.jit(make_train_step(objective, optimizer, 0.999))
    image_batch = next(_image_batches(config, comps, source, 2, 4))
    cached_batch = next(_cached_batches(config, 2, 4))
    results = [step(init_train_state(comps.params["unet"], optimizer, 1), frozen, b)
               for b in (image_batch, cached_batch)]
    (s_img, m_img), (s_cache, m_cache) = results
    np.testing.assert_allclose(float(m_cache["loss"]), float(m_img["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s_img.params), jax.tree.leaves(s_cache.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_training_from_the_cache_runs_end_to_end_with_samples(built, tmp_path):
    config, comps, source, path = built
    config = config.copy_and_resolve_references()
    config.train.steps, config.log.sample_every, config.log.sample_steps = 1, 1, 1
    summary = train(stages.for_config(config), config, tmp_path / "w")  # reads the cache: no TFDS build here
    assert summary["step"] == 1 and np.isfinite(summary["loss"])
    assert (tmp_path / "w" / "samples" / "step_1.png").is_file()
    with pytest.raises(ConfigError, match="UNet stage"):
        vae_stage = config.copy_and_resolve_references()
        vae_stage.stage = "vae"
        train(stages.for_config(vae_stage), vae_stage, tmp_path / "v")
