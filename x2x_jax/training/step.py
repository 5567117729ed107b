"""The InstructPix2Pix objective and the compiled train step (gradient accumulation inside, EMA after).

Randomness is drawn once per step for the whole global batch, shaped (accum, micro_batch, ...), from the state's
key. Because jax's threefry is partitionable, the numbers depend neither on the mesh nor on how the global batch
is split into micro-batches: a sharded step equals the 1-device step, and 4 micro-batches equal one 4x batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from x2x_jax.diffusion.schedule import NoiseSchedule, add_noise
from x2x_jax.flops import count_flops
from x2x_jax.models.vae import latent_factor
from x2x_jax.training.state import TrainState, ema_decay_at, ema_update


def to_vae_channels(images: jax.Array, channels: int) -> jax.Array:
    """(B, H, W) grey images in [-1, 1] -> (B, H, W, channels) as the VAE expects (grey repeated)."""
    return jnp.repeat(images[..., None], channels, axis=-1)


def encode_pair(vae, vae_params, past: jax.Array, current: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """IP2P's frozen-VAE work on grey (B, H, W) pairs: current's posterior mean and log-variance, past's latent
    (the posterior mode, unscaled). One encoder call on both images (one copy of the encoder in the compiled
    program: the TPU compile of the SD1.5 step spends ~40 s per copy)."""
    # Interleaved (current_0, past_0, current_1, ...), not concatenated: a batch-sharded pair stays on its devices
    # (a concatenation would move rows between devices).
    both = jnp.stack([current, past], axis=1).reshape(-1, *current.shape[1:])
    mean, logvar = vae.apply({"params": vae_params}, to_vae_channels(both, vae.in_channels), method=vae.encode)
    mean, logvar = (x.reshape(current.shape[0], 2, *x.shape[1:]) for x in (mean, logvar))
    return mean[:, 0], logvar[:, 0], mean[:, 1]


def decode_grey(vae, vae_params, latents: jax.Array) -> jax.Array:
    """Unscaled latents -> fp32 grey (B, H, W) images in [-1, 1] (the mean over the VAE's output channels)."""
    decoded = vae.apply({"params": vae_params}, latents, method=vae.decode)
    return jnp.clip(jnp.mean(decoded.astype(jnp.float32), axis=-1), -1.0, 1.0)


def image_batch_dims(batch: dict) -> tuple[int, int, tuple[int, int]]:
    """(accum, micro_batch, image (H, W)) of a batch of images shaped (accum, micro_batch, H, W)."""
    accum, micro, h, w = batch["current"].shape
    return accum, micro, (h, w)


def kernels_in_compute_dtype(params, dtype):
    """Conv/dense kernels cast to the compute dtype before apply, where they are still FSDP shards.

    Flax's Conv/Dense cast their kernels to `dtype` at use anyway (same numbers, same gradients); casting first
    lets the parameter all-gather and the gathered copies kept for the backward pass be bf16 instead of fp32.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.astype(dtype) if getattr(path[-1], "key", None) == "kernel" else x, params)


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


@dataclasses.dataclass(frozen=True)
class VAEObjective:
    """First stage of the synthetic default: a small KL autoencoder, L1 reconstruction + kl_weight * KL."""

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


def make_train_step(objective, optimizer: optax.GradientTransformation, ema_decay: float,
                    unroll_accumulation: bool | None = None) -> Callable:
    """-> train_step(state, frozen, batch) -> (state, metrics). `objective` has batch_dims / draw / prepare / loss.

    `batch` leaves are shaped (accum, micro_batch, ...); gradients are averaged over the accum axis inside the
    compiled step, so an effective batch of 1024 costs no host round trips. The accumulation is a lax.scan on
    accelerators; on CPU (unroll_accumulation=None means "on CPU") it is unrolled at trace time, because XLA:CPU
    runs convolution gradients inside a while loop ~25x slower than outside one (measured on the tiny VAE).
    """
    if unroll_accumulation is None:
        unroll_accumulation = jax.default_backend() == "cpu"

    def train_step(state: TrainState, frozen: dict, batch: dict):
        accum, micro, image_hw = objective.batch_dims(batch)
        key = jax.random.wrap_key_data(state.rng)
        key, step_key = jax.random.split(key)
        rand = objective.draw(step_key, accum, micro, image_hw)
        grad_fn = jax.value_and_grad(objective.loss)

        def accumulate(carry, xs):
            grads_sum, loss_sum = carry
            micro_batch, micro_rand = xs
            loss, grads = grad_fn(state.params, objective.prepare(frozen, micro_batch, micro_rand))
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss), None

        carry = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32))
        if unroll_accumulation:
            for i in range(accum):
                carry, _ = accumulate(carry, jax.tree.map(lambda x: x[i], (batch, rand)))
            grads, loss = carry
        else:
            (grads, loss), _ = jax.lax.scan(accumulate, carry, (batch, rand))
        return apply_gradients(state, grads, loss, accum, key, optimizer, ema_decay)

    return train_step


def apply_gradients(state: TrainState, grads_sum, loss_sum, accum: int, key: jax.Array,
                    optimizer: optax.GradientTransformation, ema_decay: float):
    """The train step after the accumulation loop: average, optimizer update, EMA -> (state, metrics). Also
    compiled on its own by `aot` (the part of the step outside the loop, whose cost XLA counts once)."""
    grads = jax.tree.map(lambda g: g / accum, grads_sum)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    ema_params = ema_update(state.ema_params, params, ema_decay_at(step, ema_decay))
    new_state = TrainState(step=step, params=params, opt_state=opt_state, ema_params=ema_params,
                           rng=jax.random.key_data(key))
    return new_state, {"loss": loss_sum / accum, "grad_norm": optax.tree.norm(grads)}


def model_flops(objective, params, frozen, batch: dict) -> float:
    """Model FLOPs of one train step (for MFU): per micro-batch, the frozen encoders' forward pass (`prepare`) plus
    3x the trained model's forward pass (`loss`: forward + backward, the usual convention). Remat's recomputation
    and attention's recomputed probabilities are not counted. Arguments may be abstract; batch leaves are shaped
    (accum, micro_batch, ...)."""
    accum, micro, image_hw = objective.batch_dims(batch)
    micro_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)
    rand = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                        jax.eval_shape(lambda k: objective.draw(k, accum, micro, image_hw), jax.random.key(0)))
    inputs = jax.eval_shape(objective.prepare, frozen, micro_batch, rand)
    return accum * (count_flops(objective.prepare, frozen, micro_batch, rand)
                    + 3 * count_flops(objective.loss, params, inputs))
