"""Stage "guidance": the learned guidance-map predictor (x2x_jax/models/guidance.py).

    python train.py --config configs/synth_tiny.py --workdir runs/synth_tiny --config.stage=guidance
    # -> runs/synth_tiny/guidance/export (config.json + diffusion_pytorch_model.safetensors); copy it to
    #    <model dir>/guidance/ and edit with `edit.py --guidance learned`.

The frozen model (`guidance.model_from`: a diffusers directory with unet/, vae/, text_encoder/) provides the
image latents, the text states and the distillation target. Per example and step:

* distillation target: the expected guidance map of the paper's procedure, E_k[R_k] * M_pseudo, with R_k the
  relevance map (IQR-clipped, min-max normalised, x2x_jax/editing/relevance.py) of one noise draw at
  t = noise_level * T and the mean taken over `guidance.draws` (K) independent draws. It is computed on the fly
  inside the jitted step (the frozen UNet runs K times on a 2B batch), not precomputed: the pipeline's joint
  rotation / flip changes the image and the instruction's side every epoch, and fresh draws each step make the
  predictor regress to the expectation rather than to K fixed samples. distill_weight = 0 leaves those UNet
  passes out of the program.
* supervised target: the data set's ground-truth change mask (synth_cxr_edit has one) averaged over f x f
  blocks to latent resolution (a soft target in [0, 1]).
* M_pseudo: the anatomical prior of the (augmented) instruction (x2x_jax/editing/priors.py), pooled like the
  mask; the predictor's map P is used at edit time as G = P * M_pseudo.

loss = distill_weight * mean((P * M - E[R] * M)^2) + mask_weight * BCE(P, mask) averaged over the prior's support
(M > 0): outside it G = 0 whatever P is, so P is neither asked nor blamed there; + dice_weight * (1 - soft Dice of
G = P * M with the mask), per example: BCE alone makes P a calibrated probability, whose G >= tau at the paper's
tau = 0.1 keeps every cell with a 10 % chance of change; the overlap term rewards the mask the edit will use.
The synthetic default (configs/synth_tiny.py) uses the mask terms alone: distilling its tiny model's weak
relevance map cost localization there (x2x_jax/assets/synth_tiny/README.md).

Trained by the one trainer (training/loop.py) like every stage; the EMA predictor is exported to WORKDIR/export
when the run reaches guidance_stage.steps. `python -m x2x_jax.evaluate.guidance measure` compares learned and
relevance guidance against the true change masks of a synthetic split.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from x2x_jax.convert.guidance import save_guidance
from x2x_jax.editing.api import load_edit_model
from x2x_jax.editing.priors import prior_for_instruction
from x2x_jax.editing.relevance import relevance_map
from x2x_jax.editing.rse import EditModel, pool_to_latent
from x2x_jax.errors import ConfigError
from x2x_jax.models.guidance import GuidancePredictor, init_params
from x2x_jax.models.tokenizer import tokenize
from x2x_jax.models.vae import latent_factor, to_vae_channels
from x2x_jax.training import data
from x2x_jax.training.stages.base import Built
from x2x_jax.training.step import image_batch_dims

KEYS = ("past", "current", "input_ids", "mask", "prior")


@dataclasses.dataclass(frozen=True)
class GuidanceObjective:
    """batch_dims / draw / prepare / loss for `make_train_step`; frozen = {"unet", "vae", "text_encoder"} params."""

    predictor: GuidancePredictor
    model: EditModel  # the frozen UNet, VAE, text encoder and noise schedule
    empty_ids: jax.Array  # (L,) the empty prompt's token ids
    draws: int = 8
    noise_level: float = 0.8
    distill_weight: float = 1.0
    mask_weight: float = 1.0
    dice_weight: float = 0.0

    def latent_shape(self, image_hw):
        f = latent_factor(self.model.vae)
        return image_hw[0] // f, image_hw[1] // f, self.model.vae.latent_channels

    def batch_dims(self, batch: dict) -> tuple[int, int, tuple[int, int]]:
        return image_batch_dims(batch)

    def draw(self, key, accum: int, micro: int, image_hw) -> dict:
        k_post, k_rel = jax.random.split(key)
        lat = self.latent_shape(image_hw)
        return {"posterior_noise": jax.random.normal(k_post, (accum, micro, *lat)),
                "relevance_noise": jax.random.normal(k_rel, (accum, self.draws, micro, *lat))}

    def prepare(self, frozen: dict, batch: dict, rand: dict) -> dict:
        m, f = self.model, latent_factor(self.model.vae)
        mean, logvar = m.vae.apply({"params": frozen["vae"]}, to_vae_channels(batch["past"], m.vae.in_channels),
                                   method=m.vae.encode)
        mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
        text = lambda ids: m.text_encoder.apply({"params": frozen["text_encoder"]}, ids)[0]  # noqa: E731
        context = text(batch["input_ids"]).astype(jnp.float32)
        prior = pool_to_latent(batch["prior"].astype(jnp.float32), f)
        out = {"image_latents": mean, "context": context, "prior": prior,
               "mask": pool_to_latent(batch["mask"].astype(jnp.float32), f)}
        if self.distill_weight:
            z_src = (mean + jnp.exp(0.5 * logvar) * rand["posterior_noise"]) * m.vae.scaling_factor
            empty = jnp.broadcast_to(text(self.empty_ids[None]), context.shape)
            T = m.schedule.num_train_timesteps
            t_rel = jnp.clip(jnp.round(self.noise_level * T), 0, T - 1).astype(jnp.int32)
            # One normalised map per draw (the paper's K = 1 map), then the mean: the expected guidance map.
            per_draw = jax.lax.map(lambda n: relevance_map(m.unet, frozen["unet"], m.schedule, z_src, mean, context,
                                                           empty, t_rel, n[None]), rand["relevance_noise"])
            out["distill"] = jnp.mean(per_draw, axis=0) * prior
        return jax.lax.stop_gradient(out)

    def loss(self, params, inputs: dict) -> jax.Array:
        p = self.predictor.apply({"params": params}, inputs["image_latents"], inputs["context"])
        prior = inputs["prior"]
        total = jnp.zeros((), jnp.float32)
        if self.distill_weight:
            total += self.distill_weight * jnp.mean(jnp.square(p * prior - inputs["distill"]))
        if self.mask_weight:
            support = (prior > 0).astype(jnp.float32)
            pc, y = jnp.clip(p, 1e-6, 1.0 - 1e-6), inputs["mask"]
            bce = -(y * jnp.log(pc) + (1.0 - y) * jnp.log1p(-pc))
            total += self.mask_weight * jnp.sum(bce * support) / jnp.maximum(jnp.sum(support), 1.0)
        if self.dice_weight:
            g, y = p * prior, inputs["mask"]  # G as the edit thresholds it, against the pooled mask
            overlap = jnp.sum(g * y, axis=(1, 2))
            dice = (2.0 * overlap + 1.0) / (jnp.sum(g, axis=(1, 2)) + jnp.sum(y, axis=(1, 2)) + 1.0)
            total += self.dice_weight * jnp.mean(1.0 - dice)
        return total


def make_predictor(config, model: EditModel) -> GuidancePredictor:
    g = config.guidance
    predictor = GuidancePredictor(latent_channels=model.vae.latent_channels,
                                  cross_attention_dim=model.text_encoder.hidden_size,
                                  block_out_channels=tuple(g.block_out_channels),
                                  attention_heads=g.attention_heads, norm_num_groups=g.norm_num_groups)
    predictor.check()
    return predictor


def with_priors(resolution: int):
    """Pipeline batch -> the same with each example's anatomical prior (host-side, from its instruction)."""

    def add(batch: dict) -> dict:
        if "mask" not in batch:
            raise ConfigError("guidance stage: the data set has no change masks (the supervised target needs "
                              "them; set guidance.mask_weight=0 and use a data set with masks)")
        r = resolution
        return {**batch, "prior": np.stack([prior_for_instruction(str(t), r, r)[0] for t in batch["instruction"]])}

    return add


def check(config) -> None:
    g = config.guidance
    weights = {"distill_weight": g.distill_weight, "mask_weight": g.mask_weight, "dice_weight": g.dice_weight}
    if g.draws < 1 or min(weights.values()) < 0 or not any(weights.values()):
        raise ConfigError(f"guidance: draws={g.draws} must be >= 1 and "
                          f"{', '.join(f'{k}={v}' for k, v in weights.items())} >= 0, not all 0")


@dataclasses.dataclass(frozen=True)
class GuidanceStage:
    source: Any = None  # a record source instead of the config's TFDS build
    name: str = "guidance"

    def build(self, config, mesh, abstract: bool = False) -> Built:
        if abstract:
            raise ConfigError("the guidance stage has no abstract build (it distils from a trained model's weights)")
        check(config)
        g = config.guidance
        if not g.model_from:
            raise ConfigError("guidance.model_from: set it to the trained model directory to distil from")
        model, frozen, tokenizer = load_edit_model(g.model_from)
        predictor = make_predictor(config, model)
        res, f = config.data.resolution, latent_factor(model.vae)
        if res % f:
            raise ConfigError(f"data.resolution={res} is not a multiple of the VAE's factor {f}")
        empty_ids = jnp.asarray(tokenize(tokenizer, [""])[0][0])
        objective = GuidanceObjective(predictor, model, empty_ids, int(g.draws), float(g.noise_level),
                                      float(g.distill_weight), float(g.mask_weight), float(g.dice_weight))
        image = jax.ShapeDtypeStruct((res, res), jnp.float32)
        example = {k: image for k in KEYS if k != "input_ids"}
        example["input_ids"] = jax.ShapeDtypeStruct((model.text_encoder.max_position_embeddings,), jnp.int32)

        def export(params, stream, workdir: Path) -> dict:
            dst = workdir / "export"
            if jax.process_index() == 0:
                save_guidance(dst, predictor, params)
            return {"export": str(dst)}

        trainable = init_params(predictor, jax.random.key(config.seed), (res // f, res // f))
        return Built(objective=objective, trainable=trainable, frozen=frozen, example=example,
                     data=data.stage_batches(config, self.source, KEYS, tokenizer=tokenizer, with_mask=True,
                                             add=with_priors(res)),
                     export=export)
