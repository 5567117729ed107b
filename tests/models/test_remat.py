"""remat_in_backward: nn.remat's values and gradients, with the recomputation really deferred to the backward pass."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2x_jax.errors import ConfigError
from x2x_jax.models.layers import recompute_in_backward, remat_in_backward, remat_policy


def test_recompute_in_backward_values_and_gradients_match_autodiff():
    def fn(params, x, steps, nothing):
        assert nothing is None
        h = jnp.tanh(x @ params["w"] + params["b"]) * steps
        return {"out": h.sum(-1), "aux": (h**2).mean()}

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((5, 7)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal(7), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)

    def loss(f):
        return lambda p, x: jnp.sum(jnp.sin(f(p, x, 3, None)["out"])) + f(p, x, 3, None)["aux"]

    for a, b in zip(jax.tree.leaves(jax.jit(loss(fn))(params, x)),
                    jax.tree.leaves(jax.jit(loss(recompute_in_backward(fn)))(params, x))):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    want = jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(params, x)
    got = jax.jit(jax.grad(loss(recompute_in_backward(fn)), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(512)(x))
        h = jnp.tanh(nn.Dense(512)(h))
        return x + nn.Dense(x.shape[-1])(h)


def _chain_grad_temp_bytes(layer_cls) -> int:
    class Chain(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(8):
                x = layer_cls(name=f"layer_{i}")(x)
            return x

    model, x = Chain(), jnp.ones((2048, 32))
    params = model.init(jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2)))
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes


def test_backward_keeps_one_layer_of_activations_not_all():
    # 8 layers, each with two (2048, 512) fp32 hidden activations (4 MiB each): without remat the backward pass keeps
    # all of them (~8 x 3 x 4 MiB); with the recomputation deferred it needs about one layer's worth at a time.
    plain = _chain_grad_temp_bytes(_Layer)
    rematted = _chain_grad_temp_bytes(remat_in_backward(_Layer))
    assert plain > 64 * 2**20
    assert rematted < plain / 3, (rematted, plain)


def test_remat_policy_names():
    assert [remat_policy(v) for v in (False, True, "none", "full", "dots")] == ["none", "full", "none", "full", "dots"]
    with pytest.raises(ConfigError, match="'all' is not a bool or one of"):
        remat_policy("all")
