"""Training stage "guidance": a few steps on a tiny synthetic set with a tiny frozen model; the loss goes down,
the export loads, and the stage's config plumbing (guidance_stage overrides train.*)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.training import tiny
from tests.training.tiny_run import build_data
from x2x_jax.convert import diffusers as bridge

RES = 32


def random_params(abstract, seed):
    """Weights from the abstract tree without compiling `init` (that costs ~1 min on a busy CPU): norms at
    identity, zero biases, small normal kernels / embeddings."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        if name == "scale":
            return np.ones(x.shape, np.float32)
        if name == "bias":
            return np.zeros(x.shape, np.float32)
        return (0.05 * rng.standard_normal(x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


@pytest.fixture(scope="module")
def frozen_dir(tmp_path_factory):
    """A tiny 'trained' IP2P model directory (random weights; the real 49408-token CLIP vocabulary)."""
    from x2x_jax.diffusion.ddim import scheduler_config
    from x2x_jax.models.clip_text import clip_text_from_config
    from x2x_jax.models.tokenizer import load_tokenizer

    unet, vae, _ = tiny.models()
    text = clip_text_from_config(dict(tiny.TEXT, vocab_size=49408, max_position_embeddings=77, eos_token_id=49407,
                                      bos_token_id=49406, pad_token_id=49407))
    p = {c: random_params(bridge.abstract_params(c, m), seed)
         for seed, (c, m) in enumerate((("unet", unet), ("vae", vae), ("text_encoder", text)))}
    dst = tmp_path_factory.mktemp("frozen") / "model"
    bridge.save_pipeline(dst, bridge.Pipeline(unet, p["unet"], vae, p["vae"], text, p["text_encoder"],
                                              load_tokenizer(), scheduler_config()))
    return dst


@pytest.fixture(scope="module")
def data_source(tmp_path_factory):
    return build_data(str(tmp_path_factory.mktemp("tfds"))).as_data_source(split="train")


def tiny_config(model_dir, steps):
    from x2x_jax.configs.common import base_config
    from x2x_jax.training.run import stage_config

    c = base_config()
    c.data.resolution = RES
    c.guidance.model_from = str(model_dir)
    c.guidance.draws = 2
    c.guidance.block_out_channels = (8, 16)
    c.guidance.attention_heads = 2
    c.guidance_stage = dict(steps=steps, per_device_batch=1, learning_rate=3e-3, ema_decay=0.9)
    c.log.every = 1
    c = stage_config(c, "guidance")
    assert c.stage == "guidance" and c.train.steps == steps and c.train.learning_rate == 3e-3
    return c


@pytest.mark.slow
def test_a_few_steps_lower_the_loss_and_the_export_loads(tmp_path, frozen_dir, data_source):
    from x2x_jax.convert.guidance import load_guidance
    from x2x_jax.training import stages
    from x2x_jax.training.loop import train

    steps = 8
    config = tiny_config(frozen_dir, steps)
    summary = train(stages.for_config(config, data_source), config, str(tmp_path / "g"))
    assert summary["step"] == steps
    losses = [json.loads(line)["loss"] for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == steps and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses

    export = tmp_path / "g" / "export"
    assert summary["export"] == str(export)
    model, params = load_guidance(export)
    width = tiny.TEXT["hidden_size"]
    assert (model.latent_channels, model.cross_attention_dim, model.block_out_channels) == (4, width, (8, 16))
    out = model.apply({"params": params}, jnp.zeros((1, RES // 2, RES // 2, 4)), jnp.zeros((1, 77, width)))
    assert out.shape == (1, RES // 2, RES // 2) and bool(jnp.all((out >= 0) & (out <= 1)))
    assert (tmp_path / "g" / "checkpoints").is_dir()


def test_batches_carry_the_change_mask_and_the_prior_of_the_augmented_instruction(frozen_dir, data_source):
    from x2x_jax.editing.priors import prior_for_instruction
    from x2x_jax.training.sharding import make_mesh
    from x2x_jax.training.stages import guidance

    config = tiny_config(frozen_dir, 1)
    config.data.flip_p = 1.0  # every instruction's side is swapped: the prior must follow the swapped text
    built = guidance.GuidanceStage(data_source).build(config, make_mesh(-1, 1))
    b = next(built.data(0, 1, 1, 4))
    assert set(b) == set(guidance.KEYS) == set(built.example)
    assert all(b[k].shape == (1, 4, RES, RES) for k in ("past", "current", "mask", "prior"))
    assert b["mask"].any() and set(np.unique(b["mask"])) <= {0.0, 1.0}
    raw = next(built.data(0, 1, 1, 4)._it)
    for text, prior in zip(raw["instruction"], b["prior"][0]):
        np.testing.assert_array_equal(prior, prior_for_instruction(str(text), RES, RES)[0])


def test_bad_stage_settings_are_config_errors(tmp_path, frozen_dir):
    from x2x_jax.errors import ConfigError
    from x2x_jax.training import stages
    from x2x_jax.training.loop import train

    config = tiny_config(frozen_dir, 1)
    config.guidance.distill_weight = config.guidance.mask_weight = 0.0
    with pytest.raises(ConfigError, match="not all 0"):
        train(stages.for_config(config), config, str(tmp_path / "a"))
    config = tiny_config("", 1)
    with pytest.raises(ConfigError, match="guidance.model_from"):
        train(stages.for_config(config), config, str(tmp_path / "b"))


def test_dice_term_is_one_minus_the_soft_dice_of_the_thresholded_map_per_example():
    from x2x_jax.training.stages.guidance import GuidanceObjective

    class FixedMap:  # stands in for the predictor: P is the "params" it is given
        @staticmethod
        def apply(variables, latents, context):
            return variables["params"]

    p = jnp.array([[[0.5, 1.0], [0.0, 0.25]], [[1.0, 1.0], [1.0, 1.0]]])
    prior = jnp.array([[[1.0, 0.5], [1.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])
    mask = jnp.array([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])
    objective = GuidanceObjective(FixedMap(), None, None, distill_weight=0.0, mask_weight=0.0, dice_weight=2.0)
    # example 0: G = [.5, .5, 0, 0], overlap .5 -> (2*.5 + 1) / (1 + 1 + 1); example 1: G = mask -> Dice 1
    expected = 2.0 * np.mean([1 - 2.0 / 3.0, 0.0])
    got = objective.loss(p, {"image_latents": None, "context": None, "prior": prior, "mask": mask})
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
