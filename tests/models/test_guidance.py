"""The learned guidance-map predictor: shapes, range, size, config and the safetensors round trip."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2x_jax.convert.guidance import load_guidance, save_guidance
from x2x_jax.errors import ConfigError, WeightsError
from x2x_jax.models.guidance import GuidancePredictor, guidance_from_config, guidance_to_config, init_params

SMALL = dict(latent_channels=4, cross_attention_dim=16, block_out_channels=(8, 16), attention_heads=2,
             norm_num_groups=8)


@pytest.fixture(scope="module")
def small():
    model = GuidancePredictor(**SMALL)
    return model, init_params(model, jax.random.key(0), (8, 8))  # params do not depend on the latent size


def inputs(b=3, h=8, w=12, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(0, 3, (b, h, w, 4)), jnp.float32),
            jnp.asarray(rng.normal(0, 3, (b, 77, d)), jnp.float32))


def test_output_is_one_map_per_image_at_latent_resolution_in_unit_range(small):
    model, params = small
    latents, context = inputs()
    apply = jax.jit(model.apply)  # one compilation instead of three op-by-op runs
    out = apply({"params": params}, latents, context)
    assert out.shape == (3, 8, 12) and out.dtype == jnp.float32
    assert bool(jnp.all((out >= 0) & (out <= 1)))
    # The text matters (cross-attention), and so does the image.
    other_text = apply({"params": params}, latents, context[::-1])
    other_image = apply({"params": params}, latents[::-1], context)
    assert not np.allclose(out, other_text) and not np.allclose(out, other_image)


def test_synth_tiny_size_is_well_under_a_million_parameters():
    model = GuidancePredictor(latent_channels=4, cross_attention_dim=32)  # the synth_tiny defaults
    shapes = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert 50_000 < n < 1_000_000, n


def test_bad_configs_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown keys"):
        guidance_from_config({"latent_channels": 4, "channels": 8})
    with pytest.raises(ConfigError, match="multiples of norm_num_groups"):
        guidance_from_config({"block_out_channels": [12, 16], "norm_num_groups": 8})
    with pytest.raises(ConfigError, match="_class_name"):
        guidance_from_config({"_class_name": "UNet2DConditionModel"})


def test_save_load_round_trip(tmp_path, small):
    model, params = small
    save_guidance(tmp_path / "g", model, params)
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["config.json",
                                                                  "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert config["_class_name"] == "GuidancePredictor" and config == guidance_to_config(model)
    loaded, loaded_params = load_guidance(tmp_path / "g")
    assert loaded == model
    jax.tree.map(np.testing.assert_array_equal, loaded_params, jax.device_get(params))
    latents, context = inputs(h=8, w=8)
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply({"params": params}, latents, context),
                                  apply({"params": loaded_params}, latents, context))


def test_loading_a_missing_or_mismatched_folder_fails_with_one_line(tmp_path, small):
    with pytest.raises(WeightsError, match="no learned guidance predictor"):
        load_guidance(tmp_path / "nowhere")
    save_guidance(tmp_path / "g", *small)
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    (tmp_path / "g" / "config.json").write_text(json.dumps({**config, "block_out_channels": [8, 24]}))
    with pytest.raises(WeightsError) as e:
        load_guidance(tmp_path / "g")
    assert "\n" not in str(e.value)
