"""The TPU attention path (layers.attention with the Pallas splash kernel, models/tpu_attention.py).

Numerics: the splash kernel as a CPU target runs it — the Pallas interpreter, kind chosen from the target by
`targets.splash_attention_kind` — against the einsum attention, forward and gradients, for SD1.5's head widths
(40, 80, 160 with several heads; a single head of 512) at sequence lengths that take several kernel blocks, and
through layers.attention at the 32x32 shape. Fallbacks: cases the kernel does not take are computed by the einsum
attention, bit for bit. Plumbing: the
modules' `attention` field reaches every attention layer and stays out of the diffusers config. Compile: one
SD1.5-shaped self-attention layer for a TPU (libtpu), forward and backward, through the kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from x2x_jax import aot, targets
from x2x_jax.errors import ConfigError
from x2x_jax.models import layers, tpu_attention
from x2x_jax.models.layers import attention, dot_product_attention

try:
    import libtpu  # noqa: F401

    HAVE_LIBTPU = True
except ImportError:
    HAVE_LIBTPU = False

SPLASH = targets.splash_attention_kind(jax.devices())  # "splash_interpret" on this CPU host
INTERPRET = SPLASH == "splash_interpret"


def qkv(b, t, s, h, d, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((b, t, h, d), (b, s, h, d),
                                                                             (b, s, h, d), (b, t, h, d)))


def test_target_decides_the_kind():
    assert SPLASH == "splash_interpret" and targets.default_attention(jax.devices()) == "einsum"
    assert targets.default_attention() == "einsum"  # this host: the CPU path stays the einsum attention


@pytest.mark.parametrize("t, s, h, d", [
    (384, 384, 2, 40),   # 3 x 3 blocks of 128
    (384, 128, 2, 80),   # 3 query blocks, one key block
    (128, 384, 2, 160),  # one query block, 3 key blocks; value width over one 128-lane tile
    (256, 256, 1, 512),  # a single head of 512 (the VAE's shape, which stays einsum; the kernel takes it)
])
def test_splash_matches_einsum_values_and_gradients(t, s, h, d):
    """The kernel itself at short sequences (layers.attention sends it only >= 1024 tokens): several blocks."""
    q, k, v, w = qkv(2, t, s, h, d)
    scale = d**-0.5

    def splash(q, k, v):
        return tpu_attention.splash_attention(q, k, v, scale, interpret=INTERPRET)

    ours = jax.jit(splash)(q, k, v)
    einsum = dot_product_attention(q, k, v, scale)
    assert ours.shape == einsum.shape and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, einsum, atol=2e-6, rtol=1e-5)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(w * fn(q, k, v)), argnums=(0, 1, 2)))(q, k, v)

    for a, b in zip(grads(splash), grads(lambda q, k, v: dot_product_attention(q, k, v, scale))):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


def test_attention_sends_long_self_attention_to_the_kernel(monkeypatch):
    """layers.attention at SD1.5's 32x32 shape (1024 tokens, width 80): the kernel, and the einsum's values."""
    q, k, v, _ = qkv(1, 1024, 1024, 1, 80, seed=3)
    assert tpu_attention.splash_applies(1024, 1024, 80)
    calls = []
    kernel = tpu_attention.splash_attention
    monkeypatch.setattr(tpu_attention, "splash_attention", lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
    out = jax.jit(lambda q, k, v: attention(q, k, v, 80**-0.5, SPLASH))(q, k, v)
    assert calls == [{"interpret": INTERPRET}]
    np.testing.assert_allclose(out, dot_product_attention(q, k, v, 80**-0.5), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("t, s, d", [
    (1024, 77, 80),    # cross-attention over the 77 text tokens
    (64, 64, 160),     # the UNet mid-block at 512 px (8 x 8 latents)
    (256, 256, 160),   # 16 x 16 latents: shorter than MIN_TOKENS, the einsum attention is estimated faster
    (1600, 1600, 80),  # 40 x 40 latents (320 px): >= 1024 tokens, not a multiple of 128
    (1024, 1024, 640),  # wider than any compiled block
])
def test_cases_the_kernel_does_not_take_are_the_einsum_attention(t, s, d):
    assert not tpu_attention.splash_applies(t, s, d)
    q, k, v, _ = qkv(1, t, s, 2, d, seed=1)
    # kind "splash" is the compiled TPU kernel, which cannot run on this CPU: the result proves the fallback.
    out = attention(q, k, v, d**-0.5, "splash")
    np.testing.assert_array_equal(out, dot_product_attention(q, k, v, d**-0.5))


def test_unknown_kind_is_a_config_error():
    q, k, v, _ = qkv(1, 8, 8, 1, 4)
    with pytest.raises(ConfigError, match="attention: 'flash'"):
        attention(q, k, v, 0.5, "flash")


@pytest.mark.parametrize("batch", [8, 4])  # split over the 8 devices; not divisible: replicated
def test_under_a_mesh_the_kernel_runs_per_device(batch):
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    q, k, v, _ = qkv(batch, 128, 128, 1, 40, seed=2)
    sharding = NamedSharding(mesh, P("data") if batch % 8 == 0 else P())
    q, k, v = jax.device_put((q, k, v), sharding)
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda q, k, v: tpu_attention.splash_attention(q, k, v, 0.2, interpret=INTERPRET))
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
        out = fn(q, k, v)
    np.testing.assert_allclose(out, dot_product_attention(q, k, v, 0.2), atol=2e-6, rtol=1e-5)


def test_attention_field_reaches_every_unet_attention_layer(monkeypatch):
    """Every UNet attention layer gets the field's kind (the diffusers config does not carry it); the VAE's
    mid-block attention is not routed (einsum on every target)."""
    from tests.oracle import TINY_UNET, TINY_VAE
    from x2x_jax.models.unet import unet_from_config, unet_to_config
    from x2x_jax.models.vae import vae_from_config

    seen = []

    def spy(q, k, v, scale, kind="einsum"):
        seen.append(kind)
        return dot_product_attention(q, k, v, scale)

    monkeypatch.setattr(layers, "attention", spy)
    unet = unet_from_config(TINY_UNET, remat=True, attention="splash")
    jax.eval_shape(lambda: unet.init(jax.random.key(0), jnp.zeros((1, 8, 8, 8)), jnp.zeros((1,)),
                                     jnp.zeros((1, 77, 32))))
    assert seen == ["splash"] * (4 * 2)  # 4 transformers (down 1, mid 1, up 2) x (self, cross)
    assert unet.clone(attention="einsum").attention == "einsum" and "attention" not in unet_to_config(unet)
    seen.clear()
    vae = vae_from_config(TINY_VAE)
    jax.eval_shape(lambda: vae.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    assert seen == ["einsum"] * 2  # the encoder's and the decoder's mid-block


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
@pytest.mark.parametrize("topology, batch", [("v6e:1", 2), ("v5e:2x2", 8)])
def test_sd15_self_attention_compiles_for_tpu_with_the_kernel(topology, batch):
    """4096 tokens, 8 heads of 40, bf16, forward + backward, for one chip (batch 2) and for 4 chips (2 each): the
    program holds the splash kernels, and on 4 chips each runs on its own batch shard (no collective)."""
    devices = targets.topology_devices(topology)
    kind = targets.splash_attention_kind(devices)
    assert kind == targets.default_attention(devices) == "splash"
    mesh = Mesh(np.asarray(devices), ("data",))
    arg = jax.ShapeDtypeStruct((batch, 4096, 8, 40), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))

    def fwd_bwd(q, k, v, d_out):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, 40**-0.5, kind), q, k, v)
        return out, *vjp(d_out)

    # The suite's "highest" matmul precision asks a TPU for fp32 contractions of bf16 operands (see test_aot.py).
    with jax.default_matmul_precision("default"), jax.set_mesh(mesh):
        compiled = jax.jit(fwd_bwd).lower(arg, arg, arg, arg).compile()
    text = compiled.as_text()
    for kernel in ("splash_mha_fwd_residuals", "splash_mha_dkv_no_residuals", "splash_mha_dq_no_residuals"):
        assert kernel in text
    assert not any(c["count"] for c in aot.collectives(text).values())
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert 0 < temp < 256 * 2**20  # no (4096 x 4096) score array: a few MiB of kernel statistics
