"""Attention: the query-blocked path computes what the one-shot path computes (values and gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2x_jax.models.layers import Attention, dot_product_attention


def reference(q, k, v, scale):
    """softmax(q kᵀ · scale) v in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def plain(q, k, v, scale):
    """The same in jnp, left to autodiff: the oracle for our written-out backward pass."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * scale
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v, precision="highest")


def qkv(t, s, seed=0, b=2, h=3, d=8):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((b, t, h, d), (b, s, h, d), (b, s, h, d)))


@pytest.mark.parametrize("t,s,block", [
    (40, 40, 16),   # self-attention, last block 8 of 16 queries
    (40, 40, 8),    # divisible
    (37, 11, 16),   # cross-attention, short context, non-divisible
    (16, 16, 16),   # exactly one block: the one-shot path
])
def test_blocked_matches_unblocked_values_and_gradients(t, s, block):
    q, k, v = qkv(t, s)
    scale = 8**-0.5
    blocked = dot_product_attention(q, k, v, scale, block=block)
    whole = dot_product_attention(q, k, v, scale, block=t)
    assert blocked.shape == (2, t, 3, 8)
    np.testing.assert_allclose(blocked, reference(q, k, v, scale), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(blocked, whole, atol=1e-6, rtol=1e-6)

    w = jnp.asarray(np.random.default_rng(1).standard_normal(blocked.shape), jnp.float32)

    def loss(block):
        return lambda q, k, v: jnp.sum(w * dot_product_attention(q, k, v, scale, block=block))

    g_blocked = jax.jit(jax.grad(loss(block), argnums=(0, 1, 2)))(q, k, v)
    g_whole = jax.grad(loss(t), argnums=(0, 1, 2))(q, k, v)
    g_autodiff = jax.grad(lambda q, k, v: jnp.sum(w * plain(q, k, v, scale)), argnums=(0, 1, 2))(q, k, v)
    for a, b, c in zip(g_blocked, g_whole, g_autodiff):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-5)


def test_backward_with_reused_inputs_and_under_vmap():
    """Second use of the inputs (residual-style) and vmap over the custom VJP: grads still match autodiff."""
    q, k, v = qkv(20, 20, seed=4)
    scale = 0.3

    def ours(x):
        return jnp.sum(jnp.tanh(dot_product_attention(x, x, x, scale, block=8)) + x**2)

    def theirs(x):
        return jnp.sum(jnp.tanh(plain(x, x, x, scale)) + x**2)

    np.testing.assert_allclose(jax.grad(ours)(q), jax.grad(theirs)(q), atol=1e-5, rtol=1e-5)
    batched = jax.vmap(jax.grad(ours))(jnp.stack([q, k]))
    np.testing.assert_allclose(batched[1], jax.grad(theirs)(k), atol=1e-5, rtol=1e-5)


def test_matches_jax_dot_product_attention_in_bf16():
    """Same fp32 score/softmax arithmetic as jax.nn.dot_product_attention, and a finite bf16 backward pass."""
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(40, 40))
    ours = dot_product_attention(q, k, v, 8**-0.5, block=16)
    theirs = jax.nn.dot_product_attention(q, k, v, scale=8**-0.5)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(ours.astype(np.float32), theirs.astype(np.float32), atol=2e-2)
    grads = jax.grad(lambda q: jnp.sum(dot_product_attention(q, k, v, 8**-0.5, block=16).astype(jnp.float32)))(q)
    assert grads.dtype == jnp.bfloat16 and np.isfinite(np.asarray(grads, np.float32)).all()


@pytest.mark.parametrize("context_len", [None, 7])
def test_module_on_nhwc_input_blocked_equals_unblocked(monkeypatch, context_len):
    """The 4-D (B, H, W, C) form with group norm and residual (the VAE mid-block), self- and cross-attention."""
    from x2x_jax.models import layers

    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 7, 16)), jnp.float32)  # 35 tokens
    context = None if context_len is None else jnp.asarray(
        np.random.default_rng(3).standard_normal((2, context_len, 16)), jnp.float32)
    module = Attention(heads=2, dim_head=8, bias=True, norm_num_groups=4, residual_connection=True)
    params = module.init(jax.random.key(0), x, context)["params"]
    whole = module.apply({"params": params}, x, context)
    monkeypatch.setattr(layers, "ATTENTION_BLOCK", 16)  # blocks of 16 queries: 16, 16, 3
    blocked = jax.jit(lambda p: module.apply({"params": p}, x, context))(params)
    assert blocked.shape == x.shape
    np.testing.assert_allclose(blocked, whole, atol=1e-5, rtol=1e-5)
