"""Stage "vae": the synthetic default's first stage, a small KL autoencoder trained on both images of each pair.

Export: WORKDIR/export/vae (a diffusers AutoencoderKL folder) with SD's scaling factor calibrated on one batch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from x2x_jax.convert import diffusers as bridge
from x2x_jax.models.vae import latent_factor, to_vae_channels
from x2x_jax.training import data
from x2x_jax.training.components import build_components
from x2x_jax.training.stages.base import Built
from x2x_jax.training.step import image_batch_dims

KEYS = ("past", "current")


@dataclasses.dataclass(frozen=True)
class VAEObjective:
    """L1 reconstruction + kl_weight * KL of both images of a pair."""

    vae: Any
    kl_weight: float = 1e-6

    def batch_dims(self, batch: dict) -> tuple[int, int, tuple[int, int]]:
        return image_batch_dims(batch)

    def draw(self, key: jax.Array, accum: int, micro: int, image_hw: tuple[int, int]) -> dict:
        f = latent_factor(self.vae)
        lat = (image_hw[0] // f, image_hw[1] // f, self.vae.latent_channels)
        return {"posterior_noise": jax.random.normal(key, (accum, micro, 2, *lat))}

    def prepare(self, frozen: dict, batch: dict, rand: dict) -> dict:
        images = jnp.stack([batch["past"], batch["current"]], axis=1)  # both images of a pair train the VAE
        return {"images": images, "posterior_noise": rand["posterior_noise"]}

    def loss(self, params, inputs: dict) -> jax.Array:
        b, two, h, w = inputs["images"].shape
        x = to_vae_channels(inputs["images"].reshape(b * two, h, w), self.vae.in_channels)
        mean, logvar = self.vae.apply({"params": params}, x, method=self.vae.encode)
        z = mean + jnp.exp(0.5 * logvar) * inputs["posterior_noise"].reshape(mean.shape)
        recon = self.vae.apply({"params": params}, z, method=self.vae.decode)
        rec = jnp.mean(jnp.abs(recon.astype(jnp.float32) - x))
        kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        return rec + self.kl_weight * kl


def calibrate_scaling_factor(vae, params, batch: dict):
    """SD's rule: scale latents to unit standard deviation (1 / std of posterior samples over a batch)."""
    images = np.concatenate([np.reshape(batch[k], (-1,) + np.shape(batch[k])[-2:]) for k in KEYS])
    x = to_vae_channels(jnp.asarray(images), vae.in_channels)
    mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params, x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.key(0), mean.shape)
    return vae.clone(scaling_factor=float(1.0 / jnp.std(z)))


@dataclasses.dataclass(frozen=True)
class VAEStage:
    source: Any = None  # a record source instead of the config's TFDS build
    name: str = "vae"

    def build(self, config, mesh, abstract: bool = False) -> Built:
        comps = build_components(config, jax.random.key(config.seed), mesh, with_unet=False, abstract=abstract)
        r = config.data.resolution
        image = jax.ShapeDtypeStruct((r, r), jnp.float32)

        def export(params, stream, workdir: Path) -> dict:
            vae = calibrate_scaling_factor(comps.vae, params, next(stream))
            dst = workdir / "export"
            if jax.process_index() == 0:
                bridge.save_vae(dst / "vae", vae.clone(dtype=jnp.float32, remat=False), params)
            return {"scaling_factor": vae.scaling_factor, "export": str(dst)}

        return Built(objective=VAEObjective(comps.vae, kl_weight=config.train.vae_kl_weight),
                     trainable=comps.params["vae"], frozen={}, example={k: image for k in KEYS},
                     data=data.stage_batches(config, self.source, KEYS),
                     export=export)
