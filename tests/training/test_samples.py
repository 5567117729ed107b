"""Periodic sample edits of the training loop: WORKDIR/samples/step_N.png = past | edited | target."""

import numpy as np
import pytest
from PIL import Image

from tests.training import tiny_run
from x2x_jax.models.tokenizer import load_tokenizer
from x2x_jax.training import data, stages
from x2x_jax.training.loop import train


@pytest.mark.slow
def test_sample_edits_are_written_every_n_steps_from_the_steps_own_batch(tmp_path):
    config = tiny_run.tiny_config(steps=2)
    config.log.sample_every = 1
    config.log.sample_steps = 2
    source = tiny_run.source(str(tmp_path / "data"))
    train(stages.for_config(config, source), config, tmp_path / "w")

    for n in (1, 2):
        grid = np.asarray(Image.open(tmp_path / "w" / "samples" / f"step_{n}.png"))
        assert grid.shape == (4 * tiny_run.RES, 3 * tiny_run.RES) and grid.dtype == np.uint8
    # the left column is the past image of the step's first examples, the right one the target (current)
    it = data.batches(config, source, ("past", "current"), 0, 1, 2, 8, tokenizer=load_tokenizer())
    first = next(it)
    left = grid_column(tmp_path / "w" / "samples" / "step_1.png", 0)
    right = grid_column(tmp_path / "w" / "samples" / "step_1.png", 2)
    np.testing.assert_allclose(left, to_uint8(first["past"][0, :4]), atol=1)
    np.testing.assert_allclose(right, to_uint8(first["current"][0, :4]), atol=1)


def grid_column(path, col):
    g = np.asarray(Image.open(path)).astype(np.int32)
    r = tiny_run.RES
    return g[:, col * r:(col + 1) * r].reshape(4, r, r)


def to_uint8(x):
    return np.round((np.clip(np.asarray(x), -1, 1) + 1) * 127.5).astype(np.int32)
