"""Periodic sample edits of the training loop: WORKDIR/samples/step_N.png = past | edited | target."""

import numpy as np
from PIL import Image

from tests.training import tiny_run
from x2x_jax.training.loop import train


def test_sample_edits_are_written_every_n_steps_from_the_steps_own_batch(tmp_path):
    config = tiny_run.tiny_config(steps=2)
    config.log.sample_every = 1
    config.log.sample_steps = 2
    factory = tiny_run.iterator_factory(str(tmp_path / "data"))
    train(config, tmp_path / "w", data_iter_factory=factory)

    for n in (1, 2):
        grid = np.asarray(Image.open(tmp_path / "w" / "samples" / f"step_{n}.png"))
        assert grid.shape == (4 * tiny_run.RES, 3 * tiny_run.RES) and grid.dtype == np.uint8
    # the left column is the past image of the step's first examples, the right one the target (current)
    it = factory(config, 0, 1, 2, 8, _tokenizer())
    first = next(it)
    left = grid_column(tmp_path / "w" / "samples" / "step_1.png", 0)
    right = grid_column(tmp_path / "w" / "samples" / "step_1.png", 2)
    np.testing.assert_allclose(left, to_uint8(first["past"][0, :4]), atol=1)
    np.testing.assert_allclose(right, to_uint8(first["current"][0, :4]), atol=1)


def _tokenizer():
    from x2x_jax.convert.tokenizer import load_tokenizer

    return load_tokenizer()


def grid_column(path, col):
    g = np.asarray(Image.open(path)).astype(np.int32)
    r = tiny_run.RES
    return g[:, col * r:(col + 1) * r].reshape(4, r, r)


def to_uint8(x):
    return np.round((np.clip(np.asarray(x), -1, 1) + 1) * 127.5).astype(np.int32)
