"""Training stage "text": the contrastive loss on known answers, a few steps on a tiny synthetic set (the loss
goes down, the export loads as a CLIP text encoder), and the synthetic default's stage plan."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.training.tiny_run import build_data
from x2x_jax.training.stages.text import soft_infonce

RES = 32


def test_soft_infonce_known_answers():
    a = 3.0
    logits = jnp.asarray([[a, 0.0], [0.0, a]])
    # two different instructions: each row and column is a 2-way softmax cross-entropy with its diagonal
    distinct = jnp.asarray([[1, 2], [1, 3]])
    np.testing.assert_allclose(soft_infonce(logits, distinct), np.log1p(np.exp(-a)), rtol=1e-6)
    # the same instruction twice: both are positives (targets 1/2, 1/2), so the loss is the soft-target entropy
    same = jnp.asarray([[1, 2], [1, 2]])
    want = -0.5 * (np.log(np.exp(a) / (1 + np.exp(a))) + np.log(1 / (1 + np.exp(a))))
    np.testing.assert_allclose(soft_infonce(logits, same), want, rtol=1e-6)
    # uninformative logits: log(batch) whatever the targets
    np.testing.assert_allclose(soft_infonce(jnp.zeros((4, 4)), jnp.arange(4)[:, None]), np.log(4), rtol=1e-6)


@pytest.fixture(scope="module")
def data_source(tmp_path_factory):
    return build_data(str(tmp_path_factory.mktemp("tfds"))).as_data_source(split="train")


def tiny_config(steps):
    from tests.training import tiny
    from x2x_jax.configs.common import base_config
    from x2x_jax.training.run import stage_config

    c = base_config()
    c.data.resolution = RES
    c.model.text_encoder = dict(tiny.TEXT, vocab_size=49408, max_position_embeddings=77, eos_token_id=49407,
                                bos_token_id=49406, pad_token_id=49407)
    c.text_stage = dict(steps=steps, per_device_batch=2, learning_rate=3e-3, ema_decay=0.0)
    c.train.compute_dtype = "float32"
    c.log.every = 1
    c = stage_config(c, "text")
    assert c.stage == "text" and c.train.steps == steps and c.train.learning_rate == 3e-3
    return c


@pytest.mark.slow
def test_a_few_steps_lower_the_loss_and_the_export_loads(tmp_path, data_source):
    from x2x_jax.convert import diffusers as bridge
    from x2x_jax.training import stages
    from x2x_jax.training.loop import train
    from x2x_jax.training.sharding import make_mesh

    steps = 16
    config = tiny_config(steps)
    stage = stages.for_config(config, data_source)
    summary = train(stage, config, str(tmp_path / "t"), return_state=True)
    assert summary["step"] == steps and 0 <= summary["retrieval_accuracy"] <= 1
    losses = [json.loads(line)["loss"] for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == steps and all(np.isfinite(losses))
    # on one fixed batch of 16 pairs (every step draws another): the trained towers beat their initialisation
    built = stage.build(config, make_mesh(-1, 1))
    batch = jax.tree.map(lambda x: x[0], next(built.data(0, 1, 1, 16)))
    before = float(built.objective.loss(built.trainable, batch))
    after = float(built.objective.loss(summary["state"].params, batch))
    assert after < 0.9 * before, (before, after)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         summary["state"].params["text_encoder"], built.trainable["text_encoder"])
    assert max(jax.tree.leaves(moved)) > 1e-3  # the text encoder itself trains, not only the image tower

    export = tmp_path / "t" / "export"
    assert summary["export"] == str(export)
    text, params = bridge.load_text_encoder(export / "text_encoder")
    assert text.hidden_size == config.model.text_encoder["hidden_size"] and text.vocab_size == 49408
    out = text.apply({"params": params}, jnp.zeros((1, 77), jnp.int32))[0]
    assert out.shape == (1, 77, text.hidden_size) and bool(jnp.all(jnp.isfinite(out)))


def test_the_synthetic_default_trains_the_text_tower_between_vae_and_unet(tmp_path):
    from x2x_jax.configs import synth_tiny
    from x2x_jax.training.run import plan

    config = synth_tiny.get_config()
    steps = plan(config, str(tmp_path))
    assert [c.stage for c, _ in steps] == ["vae", "text", "unet"]
    (vae, vae_dir), (text, text_dir), (unet, unet_dir) = steps
    assert text.train.steps == config.text_stage["steps"] and text.model.vae_from == ""
    assert unet.model.vae_from == str(tmp_path / "vae" / "export")
    assert unet.model.text_encoder_from == str(tmp_path / "text" / "export")
    assert unet.train.steps == config.train.steps  # the stage overrides do not leak into the UNet stage
    config.text_stage.steps = 0  # --config.text_stage.steps=0: the earlier two-stage recipe
    assert [c.stage for c, _ in plan(config, str(tmp_path))] == ["vae", "unet"]
    assert not plan(config, str(tmp_path))[1][0].model.get("text_encoder_from")
    del config.text_stage  # a config without a text stage keeps the frozen encoder it is given
    assert [c.stage for c, _ in plan(config, str(tmp_path))] == ["vae", "unet"]
