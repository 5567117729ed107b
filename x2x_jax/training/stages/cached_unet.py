"""Stage "unet" with data.latent_cache=DIR: the InstructPix2Pix objective on latents the frozen VAE encoded once
(training/latent_cache.py, built by --config.stage=latents), so the step runs no VAE.

Everything but the data is the image stage's (stages/unet.py): the objective samples the target latent from the
cached posterior at every step, the export and the samples are the same. The cache holds un-augmented pairs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from x2x_jax.training import data, latent_cache
from x2x_jax.training.components import build_components
from x2x_jax.training.stages.base import Built
from x2x_jax.training.stages.unet import export_pipeline, frozen_params, make_sampler, objective


@dataclasses.dataclass(frozen=True)
class CachedUNetStage:
    name: str = "unet"

    def build(self, config, mesh, abstract: bool = False) -> Built:
        comps = build_components(config, jax.random.key(config.seed), mesh, abstract=abstract)
        if not abstract:
            latent_cache.check(config, comps.params["vae"])
        ip2p = objective(config, comps)
        r = config.data.resolution
        latent = jax.ShapeDtypeStruct(ip2p.latent_shape((r, r)), jnp.float32)
        ids = jax.ShapeDtypeStruct((comps.text_encoder.max_position_embeddings,), jnp.int32)
        example = {"current_mean": latent, "current_logvar": latent, "past_latent": latent, "input_ids": ids}

        def batches(process_index, process_count, accum, local_micro):
            # No worker processes: they would pickle the memory-mapped arrays by value.
            return data.batches(config, latent_cache.CachedSource(latent_cache.cache_path(config)),
                                latent_cache.ARRAYS, process_index, process_count, accum, local_micro,
                                augment=False, worker_count=0)

        return Built(objective=ip2p, trainable=comps.params["unet"], frozen=frozen_params(config, comps, mesh, abstract),
                     example=example, data=batches,
                     export=lambda params, stream, workdir: export_pipeline(comps, params, workdir),
                     sampler=make_sampler(config, comps))
