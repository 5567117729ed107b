"""Tiny models and batches shared by the training tests."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.oracle import TINY_TEXT, TINY_UNET, TINY_VAE
from x2x_jax.diffusion.ddim import scheduler_config
from x2x_jax.diffusion.schedule import noise_schedule
from x2x_jax.models.clip_text import clip_text_from_config
from x2x_jax.models.unet import unet_from_config
from x2x_jax.models.vae import vae_from_config
from x2x_jax.training.stages.unet import IP2PObjective

# The suite's tiny models (tests/oracle.py) as the training tests use them: a grey VAE and a CLIP over 8-token ids.
UNET = TINY_UNET
VAE = dict(TINY_VAE, in_channels=1, out_channels=1, scaling_factor=0.5)
TEXT = dict(TINY_TEXT, vocab_size=100, max_position_embeddings=8, eos_token_id=99, bos_token_id=98, pad_token_id=99)
RES = 16


def models():
    return unet_from_config(UNET), vae_from_config(VAE), clip_text_from_config(TEXT)


def params(seed=0):
    unet, vae, text = models()
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "unet": unet.init(k1, jnp.zeros((1, RES // 2, RES // 2, 8)), jnp.zeros((1,)),
                          jnp.zeros((1, 8, TEXT["hidden_size"])))["params"],
        "vae": vae.init(k2, jnp.zeros((1, RES, RES, 1)))["params"],
        "text_encoder": text.init(k3, jnp.zeros((1, 8), jnp.int32))["params"],
    }


def objective(p=0.05):
    unet, vae, text = models()
    empty = jnp.asarray([98, 99, 99, 99, 99, 99, 99, 99], jnp.int32)
    return IP2PObjective(unet, vae, text, noise_schedule(scheduler_config()), empty, p)


def batch(accum, micro, seed=0):
    rng = np.random.default_rng(seed)
    n = accum * micro
    return {
        "past": rng.uniform(-1, 1, (accum, micro, RES, RES)).astype(np.float32),
        "current": rng.uniform(-1, 1, (accum, micro, RES, RES)).astype(np.float32),
        "input_ids": rng.integers(0, 98, (accum, micro, 8)).astype(np.int32),
    } if n else None
