"""Train state, optimizer and EMA: plain pytrees and pure functions."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # typed-free uint32 key data, so orbax stores it as a plain array


def make_optimizer(learning_rate: float, weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, grad_clip: float | None = None) -> optax.GradientTransformation:
    """AdamW with a constant learning rate (the paper's recipe), optionally after global-norm clipping."""
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if grad_clip:
        return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
    return adamw


def ema_decay_at(step: jax.Array, max_decay: float) -> jax.Array:
    """LDM's EMA warm-up: min(max_decay, (1 + n) / (10 + n)) with n the number of updates so far."""
    n = step.astype(jnp.float32)
    return jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))


def ema_update(ema_params, params, decay: jax.Array):
    return jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema_params, params)


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
