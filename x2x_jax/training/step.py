"""The train step every stage compiles: an objective's loss, gradient accumulation inside, AdamW and EMA after.

An objective (one per stage, training/stages/) has batch_dims(batch) -> (accum, micro, image (H, W)),
draw(key, accum, micro, image_hw) -> the step's random numbers, prepare(frozen, micro_batch, rand) -> the loss's
inputs (frozen models' work, no gradient) and loss(params, inputs) -> scalar.

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from x2x_jax.flops import count_flops
from x2x_jax.models.layers import kernels_in_compute_dtype
from x2x_jax.training.state import TrainState, ema_decay_at, ema_update


def image_batch_dims(batch: dict) -> tuple[int, int, tuple[int, int]]:
    """(accum, micro_batch, image (H, W)) of a batch of images shaped (accum, micro_batch, H, W)."""
    accum, micro, h, w = batch["current"].shape
    return accum, micro, (h, w)


def make_train_step(objective, optimizer: optax.GradientTransformation, ema_decay: float,
                    unroll_accumulation: bool | None = None, gather_once: "GatherOnce | None" = None) -> Callable:
    """-> train_step(state, frozen, batch) -> (state, metrics). `objective` has batch_dims / draw / prepare / loss.

    `batch` leaves are shaped (accum, micro_batch, ...); gradients are averaged over the accum axis inside the
    compiled step, so an effective batch of 1024 costs no host round trips. The accumulation is a lax.scan on
    accelerators; on CPU (unroll_accumulation=None means "on CPU") it is unrolled at trace time, because XLA:CPU
    runs convolution gradients inside a while loop ~25x slower than outside one (measured on the tiny VAE).
    gather_once: None (FSDP as is: each weight shard is all-gathered where it is used, in every micro-step), or
    a `GatherOnce`: the loop differentiates one replicated compute-dtype copy of the parameters made before it.
    """
    if unroll_accumulation is None:
        unroll_accumulation = jax.default_backend() == "cpu"

    def train_step(state: TrainState, frozen: dict, batch: dict):
        accum, micro, image_hw = objective.batch_dims(batch)
        key = jax.random.wrap_key_data(state.rng)
        key, step_key = jax.random.split(key)
        rand = objective.draw(step_key, accum, micro, image_hw)
        grad_fn = jax.value_and_grad(objective.loss)
        params = state.params if gather_once is None else gather_once.copy(state.params)

        def accumulate(carry, xs):
            grads_sum, loss_sum = carry
            micro_batch, micro_rand = xs
            loss, grads = grad_fn(params, objective.prepare(frozen, micro_batch, micro_rand))
            if gather_once is not None:
                grads = gather_once.like_params(grads, state.params)
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


@dataclasses.dataclass(frozen=True)
class GatherOnce:
    """Gather the FSDP-sharded parameters once per train step instead of once per micro-step (ZeRO-2).

    Under plain FSDP the partitioner all-gathers every weight shard where the micro-step uses it — in the forward
    pass and again in the backward pass, in each of the `accum` micro-steps. Here the accumulation loop
    differentiates a copy made before it: kernels cast to the compute dtype (Flax casts them at use anyway: same
    numbers), replicated over the mesh. Each micro-step's gradients go back to the parameters' dtype and FSDP
    sharding (one reduce-scatter) before they are added to the sharded fp32 accumulator; the master weights, Adam
    moments and EMA stay sharded. Costs one replicated compute-dtype copy of the parameters per chip.
    """

    mesh: Mesh
    param_shardings: Any  # the params' NamedShardings (a pytree like the params)
    compute_dtype: Any

    def copy(self, params):
        return jax.lax.with_sharding_constraint(kernels_in_compute_dtype(params, self.compute_dtype),
                                                NamedSharding(self.mesh, P()))

    def like_params(self, grads, params):
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return jax.lax.with_sharding_constraint(grads, self.param_shardings)


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
