"""Stage "unet": fine-tune the InstructPix2Pix UNet on (past, instruction, current) with the VAE and the CLIP text
encoder frozen (the paper's recipe; the synthetic default's second stage).

The frozen VAE encodes both images inside the step (data.latent_cache moves that work offline:
stages/cached_unet.py). Export: WORKDIR/export, a diffusers pipeline directory (unet/, vae/, text_encoder/,
tokenizer/, scheduler/) that edit.py loads. Samples (log.sample_every): plain IP2P edits of the step's own batch.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from x2x_jax.convert import diffusers as bridge
from x2x_jax.diffusion.schedule import NoiseSchedule, add_noise, noise_schedule
from x2x_jax.editing.rse import EditModel, EditParams, edit_batch
from x2x_jax.models.layers import kernels_in_compute_dtype
from x2x_jax.models.vae import decode_grey, encode_pair, latent_factor
from x2x_jax.training import data
from x2x_jax.training.components import Components, build_components, compute_dtype
from x2x_jax.training.sharding import replicated
from x2x_jax.training.stages.base import Built
from x2x_jax.training.step import image_batch_dims

KEYS = ("past", "current", "input_ids")


@dataclasses.dataclass(frozen=True)
class IP2PObjective:
    """epsilon-MSE of InstructPix2Pix with IP2P's per-sample conditioning dropout.

    r ~ U[0, 1) per sample: the text is replaced by the empty prompt for r < 2p, the image latent is zeroed for
    p <= r < 3p (p = 0.05: 5% text only, 5% both, 5% image only).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    schedule: NoiseSchedule
    empty_ids: jax.Array  # (77,) token ids of the empty prompt
    cond_dropout_p: float = 0.05

    def latent_shape(self, image_hw: tuple[int, int]) -> tuple[int, int, int]:
        f = latent_factor(self.vae)
        return image_hw[0] // f, image_hw[1] // f, self.vae.latent_channels

    def batch_dims(self, batch: dict) -> tuple[int, int, tuple[int, int]]:
        """`image_batch_dims`, also of a latent-cache batch (image size = latent size x the VAE's factor)."""
        if "current" in batch:
            return image_batch_dims(batch)
        accum, micro, h, w, _ = batch["past_latent"].shape
        f = latent_factor(self.vae)
        return accum, micro, (h * f, w * f)

    def draw(self, key: jax.Array, accum: int, micro: int, image_hw: tuple[int, int]) -> dict:
        k_t, k_noise, k_post, k_r = jax.random.split(key, 4)
        lat = self.latent_shape(image_hw)
        return {
            "t": jax.random.randint(k_t, (accum, micro), 0, self.schedule.num_train_timesteps),
            "noise": jax.random.normal(k_noise, (accum, micro, *lat)),
            "posterior_noise": jax.random.normal(k_post, (accum, micro, *lat)),
            "r": jax.random.uniform(k_r, (accum, micro)),
        }

    def conditioning_masks(self, r: jax.Array) -> tuple[jax.Array, jax.Array]:
        p = self.cond_dropout_p
        drop_text = r < 2 * p
        drop_image = (r >= p) & (r < 3 * p)
        return drop_text, drop_image

    def prepare(self, frozen: dict, batch: dict, rand: dict) -> dict:
        """Frozen VAE / text encoder work for one micro-batch: latents, noisy latents, conditioning. A batch from
        a latent cache (training/latent_cache.py) brings the VAE's outputs with it."""
        if "past_latent" in batch:
            mean, logvar, image_latents = batch["current_mean"], batch["current_logvar"], batch["past_latent"]
        else:
            mean, logvar, image_latents = encode_pair(self.vae, frozen["vae"], batch["past"], batch["current"])
        latents = (mean + jnp.exp(0.5 * logvar) * rand["posterior_noise"]) * self.vae.scaling_factor
        drop_text, drop_image = self.conditioning_masks(rand["r"])
        ids = jnp.where(drop_text[:, None], self.empty_ids[None, :], batch["input_ids"])
        context = self.text_encoder.apply({"params": frozen["text_encoder"]}, ids)[0]
        image_latents = jnp.where(drop_image[:, None, None, None], 0.0, image_latents)
        noisy = add_noise(self.schedule, latents, rand["noise"], rand["t"])
        inputs = {"unet_input": jnp.concatenate([noisy, image_latents], axis=-1), "t": rand["t"],
                  "context": context, "target": rand["noise"]}
        return jax.lax.stop_gradient(inputs)

    def loss(self, params, inputs: dict) -> jax.Array:
        params = kernels_in_compute_dtype(params, self.unet.dtype)
        pred = self.unet.apply({"params": params}, inputs["unet_input"], inputs["t"], inputs["context"])
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - inputs["target"]))


def frozen_params(config, comps: Components, mesh, abstract: bool = False) -> dict:
    """The frozen VAE and text encoder, kernels in the compute dtype (as diffusers' scripts keep them)."""
    frozen = {k: comps.params[k] for k in ("vae", "text_encoder")}
    cast = functools.partial(kernels_in_compute_dtype, dtype=compute_dtype(config.train.compute_dtype, mesh))
    return jax.eval_shape(cast, frozen) if abstract else cast(frozen)


def objective(config, comps: Components) -> IP2PObjective:
    return IP2PObjective(comps.unet, comps.vae, comps.text_encoder, noise_schedule(comps.scheduler_config),
                         comps.empty_ids(), config.train.cond_dropout_p)


def export_pipeline(comps: Components, params, workdir: Path) -> dict:
    """The trained UNet with the frozen components, tokenizer and scheduler as a diffusers directory."""
    dst = workdir / "export"
    if jax.process_index() == 0:
        bridge.save_pipeline(dst, bridge.Pipeline(
            unet=comps.unet.clone(dtype=jnp.float32, remat=False), unet_params=params,
            vae=comps.vae.clone(dtype=jnp.float32, remat=False), vae_params=comps.params["vae"],
            text_encoder=comps.text_encoder.clone(dtype=jnp.float32), text_params=comps.params["text_encoder"],
            tokenizer=comps.tokenizer, scheduler_config=comps.scheduler_config))
    return {"export": str(dst)}


def make_sampler(config, comps: Components):
    """-> (mesh, micro) -> sample(ema_params, frozen, batch) -> (3, k, H, W) rows past | edited | target,
    replicated on every process: plain IP2P edits (tau = 0, the paper's scales, `log.sample_steps` DDIM steps) of
    the first k examples of the step's own global batch, so sampling never draws from (or perturbs) the data
    iterator."""
    model = EditModel(comps.unet, comps.vae, comps.text_encoder, noise_schedule(comps.scheduler_config),
                      comps.scheduler_config)
    empty_ids = comps.empty_ids()

    def for_mesh(mesh, micro: int):
        k = min(4, micro)

        def sample(ema_params, frozen, batch):
            ids = batch["input_ids"][0, :k]
            if "past" in batch:
                past, current = batch["past"][0, :k], batch["current"][0, :k]
            else:  # a latent-cache batch has no images: show the VAE's decodings
                past, current = (decode_grey(comps.vae, frozen["vae"], batch[key][0, :k])
                                 for key in ("past_latent", "current_mean"))
            out = edit_batch(model, {"unet": ema_params, **frozen}, past, ids, empty_ids, jnp.ones_like(past),
                             jnp.arange(k, dtype=jnp.uint32), EditParams(tau=0.0),
                             num_steps=int(config.log.sample_steps))
            return jnp.stack([past, out["edited"].astype(past.dtype), current])

        jitted = jax.jit(sample, out_shardings=replicated(mesh))

        def on_mesh(*args):  # traced with the mesh as context: the Pallas attention kernels shard_map over it
            with jax.set_mesh(mesh):
                return jitted(*args)

        return on_mesh

    return for_mesh


@dataclasses.dataclass(frozen=True)
class UNetStage:
    source: Any = None  # a record source instead of the config's TFDS build
    name: str = "unet"

    def build(self, config, mesh, abstract: bool = False) -> Built:
        comps = build_components(config, jax.random.key(config.seed), mesh, abstract=abstract)
        r = config.data.resolution
        image = jax.ShapeDtypeStruct((r, r), jnp.float32)
        ids = jax.ShapeDtypeStruct((comps.text_encoder.max_position_embeddings,), jnp.int32)

        return Built(objective=objective(config, comps), trainable=comps.params["unet"],
                     frozen=frozen_params(config, comps, mesh, abstract),
                     example={"past": image, "current": image, "input_ids": ids},
                     data=data.stage_batches(config, self.source, KEYS, tokenizer=comps.tokenizer),
                     export=lambda params, stream, workdir: export_pipeline(comps, params, workdir),
                     sampler=make_sampler(config, comps))
