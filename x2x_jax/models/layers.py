"""Building blocks shared by the SD 1.x UNet and VAE, with the exact semantics of PyTorch diffusers.

Flax Linen, NHWC. Every module takes a compute `dtype` (params stay fp32). Submodule names are diffusers' PyTorch
attribute names, list indices joined with `_` (`to_out.0` -> `to_out_0`, `ff.net.0.proj` -> `ff/net_0/proj`), so a
checkpoint converts with a generic rename + transpose (see x2x_jax/convert/).

Formulas follow torch, not diffusers' old Flax port: GroupNorm with the two-pass variance and an explicit eps,
exact (erf) GELU in GEGLU, eps 1e-6 for Transformer2DModel's GroupNorm and LayerNorm eps 1e-5 in the blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from x2x_jax.errors import ConfigError
from x2x_jax.models import tpu_attention


def kernels_in_compute_dtype(params, dtype):
    """Conv/dense kernels cast to the compute dtype before apply (in training, where they are still FSDP shards).

    Flax's Conv/Dense cast their kernels to `dtype` at use anyway (same numbers, same gradients); casting first
    lets the parameter all-gather and the gathered copies kept for the backward pass be bf16 instead of fp32 (and
    frozen models are stored so, as diffusers' scripts keep a frozen VAE / text encoder in weight_dtype; the edit
    program is given its weights so: cast once at load, not in every DDIM step).
    """
    if jnp.dtype(dtype) == jnp.float32:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.astype(dtype) if getattr(path[-1], "key", None) == "kernel" else x, params)


Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # diffusers.models.activations.get_activation
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation diffusers' `get_activation(name)` returns."""
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ConfigError(f"act_fn: unsupported activation {name!r} (supported: {sorted(ACTIVATIONS)})") from None


def conv(features: int, kernel: int = 3, stride: int = 1, padding: int | Sequence[tuple[int, int]] | None = None,
         *, name: str, dtype: Dtype = jnp.float32) -> nn.Conv:
    """`torch.nn.Conv2d(..., kernel, stride, padding)`; padding defaults to (kernel - 1) // 2 on every side."""
    if padding is None:
        padding = (kernel - 1) // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=tuple(padding), dtype=dtype,
                   param_dtype=jnp.float32, name=name)


def dense(features: int, *, name: str, use_bias: bool = True, dtype: Dtype = jnp.float32) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def layer_norm(eps: float, *, name: str, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """`torch.nn.LayerNorm(dim, eps)`: two-pass variance, fp32 statistics."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32, name=name)


class GroupNorm(nn.Module):
    """`torch.nn.GroupNorm(num_groups, C, eps, affine=True)` over the last (channel) axis of (B, ..., C).

    Statistics are taken in fp32 over each group's channels and all spatial positions, biased variance computed
    around the mean (as torch does), then the result is cast to `dtype`. The sums run over the spatial axes first
    and then over each group's channels, and the normalisation is applied per channel, so the activation keeps its
    shape: reshaping it to (..., groups, C / groups) made the TPU compiler materialise an fp32 copy of it in that
    layout (SD1.5 edit loop: 16 % of the bytes XLA counts per DDIM step went to GroupNorm).
    """

    num_groups: int
    epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, g = x.shape[-1], self.num_groups
        if c % g:
            raise ConfigError(f"norm_num_groups: {g} does not divide the {c} channels of {self.name}")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        spatial = tuple(range(1, x.ndim - 1))
        count = math.prod(x.shape[1:-1]) * (c // g)

        def group_mean(per_channel_sum):  # (B, C) sums -> (B, 1, ..., 1, C): each channel gets its group's mean
            m = per_channel_sum.reshape(-1, g, c // g).sum(-1) / count
            return jnp.repeat(m, c // g, axis=-1).reshape(x.shape[0], *(1,) * len(spatial), c)

        x32 = x.astype(jnp.float32)
        centred = x32 - group_mean(x32.sum(spatial))
        var = group_mean(jnp.square(centred).sum(spatial))
        return (centred * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias).astype(self.dtype)


# --------------------------------------------------------------------------------------------- remat


def recompute_in_backward(fn: Callable) -> Callable:
    """`jax.checkpoint(fn)` that every backend honours: fn's internals are recomputed in the backward pass.

    jax.checkpoint only fences its recomputation with an optimization barrier, which XLA:CPU removes before
    common-subexpression elimination and scheduling: the recomputation is merged back into the forward pass and
    remat does nothing (a toy chain of 8 rematted MLP layers keeps 274 MiB of temps, as without remat). Here the
    recomputation's inputs take `+ 0 * g`, a scalar of the incoming gradient: a data dependency no pass can
    remove, so the recomputation (and the all-gathers of FSDP-sharded weights in it) runs when the gradient
    arrives, and the toy needs 51 MiB. The cost is one add per input; a NaN/inf gradient makes all of fn's
    gradients NaN, which they would mostly be anyway.
    """

    @jax.custom_vjp
    def rematted(*args):
        return fn(*args)

    def forward(*args):
        return fn(*args), args

    def backward(args, output_grad):
        zero = 0 * jax.tree.leaves(output_grad)[0].reshape(-1)[0].astype(jnp.float32)
        args = jax.tree.map(lambda a: a + zero.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, args)
        _, vjp = jax.vjp(fn, *args)
        return vjp(output_grad)

    rematted.defvjp(forward, backward)
    return rematted


def _lifted_remat(fn):
    """flax.core.lift.checkpoint with `recompute_in_backward` in place of jax.checkpoint."""

    def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
        def run(variable_groups, rng_groups, *args):
            scope = scope_fn(variable_groups, rng_groups)
            return fn(scope, *args), repack_fn(scope)

        return recompute_in_backward(run)(variable_groups, rng_groups, *args)

    return nn.transforms.lift.pack(inner, (True,), (True,), (True,), name="remat")


def remat_in_backward(module_cls: type[nn.Module]) -> type[nn.Module]:
    """`nn.remat(module_cls)` (same parameter tree, same values) recomputing in the backward pass only."""
    return nn.transforms.lift_transform(_lifted_remat, module_cls)


# A model's `remat` field: False / "none" keeps every activation; True / "full" recomputes each block's internals
# in the backward pass (`remat_in_backward`, honoured by every backend); "dots" is jax.checkpoint with
# `dots_with_no_batch_dims_saveable` (the usual LLM policy: matmul outputs that carry no batch dimension are kept,
# everything else recomputed). XLA:CPU drops jax.checkpoint's barrier, so "dots" saves nothing there; on TPU/GPU
# it does. Which one a TPU step should use is decided by compiling both (docs/performance.md, TPU attention).
REMAT_POLICIES = ("none", "full", "dots")


def remat_policy(remat) -> str:
    """A `remat` value (bool or policy name) as one of REMAT_POLICIES."""
    if isinstance(remat, (bool, np.bool_)):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"remat: {remat!r} is not a bool or one of {REMAT_POLICIES}")
    return remat


def rematted(module_cls: type[nn.Module], remat) -> type[nn.Module]:
    """module_cls under the remat policy `remat` (bool or policy name); the parameter tree is unchanged."""
    policy = remat_policy(remat)
    if policy == "full":
        return remat_in_backward(module_cls)
    if policy == "dots":
        return nn.remat(module_cls, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return module_cls


# --------------------------------------------------------------------------------------------- resampling


def nearest_resize(x, size: tuple[int, int]):
    """`F.interpolate(x, size=size, mode="nearest")` on NHWC: source index floor(dst * in / out)."""
    h, w = x.shape[1:3]
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)

    def index(n_in, n_out):  # torch computes the scale in fp32
        src = np.floor(np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)).astype(np.int64)
        return np.minimum(src, n_in - 1)

    return x[:, index(h, size[0])][:, :, index(w, size[1])]


class Downsample2D(nn.Module):
    """diffusers `Downsample2D(use_conv=True, padding=p)`: 3x3 conv, stride 2.

    padding=0 (the VAE encoder) pads right and bottom by one first, like diffusers' `F.pad(x, (0, 1, 0, 1))`.
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return conv(self.out_channels, 3, 2, pad, name="conv", dtype=self.dtype)(x)


class Upsample2D(nn.Module):
    """diffusers `Upsample2D(use_conv=True)`: nearest x2 (or to `output_size`), then a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, output_size: tuple[int, int] | None = None):
        size = (2 * x.shape[1], 2 * x.shape[2]) if output_size is None else tuple(output_size)
        x = nearest_resize(x, size)
        return conv(self.out_channels, 3, name="conv", dtype=self.dtype)(x)


# --------------------------------------------------------------------------------------------- resnet, time


def batch_sharded(x: jax.Array) -> jax.Array:
    """Pin `x`'s leading (batch) dimension to every axis of the context mesh (`jax.set_mesh`: the train step's
    layout, data x fsdp), when one is set and the batch divides evenly; the identity otherwise.

    Left to itself, the SPMD partitioner chose for the first resnet of the SD-shaped UNet on v5e:16x16 to all-gather
    that block's activations over all 256 chips (2.5 GiB each) and run its conv on the whole 1024-image batch on
    every chip (why was not isolated; the FSDP-sharded time-embedding projection is that block's one input the batch
    layout does not pin). Pinned at block boundaries, only the weights are gathered, as FSDP intends.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or x.shape[0] % mesh.size:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(mesh.axis_names))


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` (pre-norm, time_embedding_norm="default").

    `conv_shortcut` (1x1) exists when the input channel count differs from `out_channels`; `time_emb_proj` only
    when a `temb` is given (the VAE passes None).
    """

    out_channels: int
    groups: int
    eps: float
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        act = activation(self.act_fn)
        h = act(GroupNorm(self.groups, self.eps, dtype=self.dtype, name="norm1")(x))
        h = conv(self.out_channels, 3, name="conv1", dtype=self.dtype)(h)
        if temb is not None:
            t = batch_sharded(dense(self.out_channels, name="time_emb_proj", dtype=self.dtype)(act(temb)))
            h = h + t[:, None, None, :]
        h = act(GroupNorm(self.groups, self.eps, dtype=self.dtype, name="norm2")(h))
        h = conv(self.out_channels, 3, name="conv2", dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", dtype=self.dtype)(x)
        out = x.astype(h.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return batch_sharded(out)


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0,
                       scale: float = 1.0, max_period: float = 10000.0):
    """diffusers `get_timestep_embedding`: (N,) timesteps (int or float) -> (N, dim) fp32 sinusoids."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    emb = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = scale * emb
    sin, cos = jnp.sin(emb), jnp.cos(emb)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: linear_1 -> act -> linear_2."""

    time_embed_dim: int
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        # Pinned to the batch layout: left to the FSDP-sharded linear_1 kernel, the activation came out sharded along
        # its features, and the backward pass reshuffled it with collective-permutes and all-to-alls (tiny FSDP step
        # on v5e:2x2: 3 + 3 of them, none with the pin; tests/test_aot.py).
        x = batch_sharded(dense(self.time_embed_dim, name="linear_1", dtype=self.dtype)(x))
        x = activation(self.act_fn)(x)
        return dense(self.time_embed_dim, name="linear_2", dtype=self.dtype)(x)


# --------------------------------------------------------------------------------------------- attention

ATTENTION_BLOCK = 256  # queries per block once a sequence is longer than this


def dot_product_attention(q, k, v, scale: float, block: int | None = None):
    """softmax(q kᵀ · scale) v: (B, T, heads, D) queries, (B, S, heads, D) keys/values -> (B, T, heads, D).

    Scores, softmax statistics and gradients are fp32; the probabilities are cast to v's dtype for the product
    with v (what jax.nn.dot_product_attention's XLA path does). Sequences of more than `block` (default
    ATTENTION_BLOCK) queries go `block` queries at a time, so only one block's (B, heads, block, S) scores are
    ever live (Rabe & Staats, "Self-attention does not need O(n^2) memory"). The backward pass is written out
    (custom VJP, as FlashAttention's): it keeps only the output and the per-query log-sum-exp, recomputes each
    block's probabilities and accumulates dK, dV over blocks. Autodiff of the forward pass instead makes XLA:CPU
    materialise and zero-fill T x S gradient buffers and contract on transposed layouts — it made the tiny
    training step ~30 % slower. Plain einsums rather than jax.nn.dot_product_attention: on XLA:CPU that one is
    several times slower at 1k+ tokens.
    """
    return _attention(q, k, v, float(scale), int(block or ATTENTION_BLOCK))


def _heads_first(x):  # (B, T, heads, D) <-> (B, heads, T, D)
    return x.transpose(0, 2, 1, 3)


def _query_blocks(x, block: int):
    """(B, heads, T, ...) -> (n, B, heads, block, ...), zero-padding the last block."""
    b, h, t = x.shape[:3]
    n = -(-t // block)
    x = jnp.pad(x, [(0, 0), (0, 0), (0, n * block - t)] + [(0, 0)] * (x.ndim - 3))
    return jnp.moveaxis(x.reshape(b, h, n, block, *x.shape[3:]), 2, 0)


def _join_blocks(x, t: int):
    """Inverse of _query_blocks: (n, B, heads, block, ...) -> (B, heads, T, ...)."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(*x.shape[:2], -1, *x.shape[4:])[:, :, :t]


def _scaled_queries(q, scale):
    # Heads-first q times the scale: scaling q rather than the scores keeps the multiply off the (Tq, S) arrays,
    # and the backward pass reuses the same scaled q for its scores and for dK.
    return _heads_first(q) * jnp.asarray(scale, q.dtype)


def _scores(q_scaled, k):  # heads-first (B, h, Tq, D) x (B, h, S, D) -> fp32 (B, h, Tq, S)
    return jnp.einsum("bhqd,bhkd->bhqk", q_scaled, k, preferred_element_type=jnp.float32)


def _attention_forward(q_scaled, k, v, block):
    """Heads-first output (B, h, T, D) and fp32 log-sum-exp of the scores (B, h, T)."""

    def attend(q):
        s = _scores(q, k)
        m = s.max(-1, keepdims=True)
        e = jnp.exp(s - m)
        total = e.sum(-1, keepdims=True)
        out = jnp.einsum("bhqk,bhkd->bhqd", (e / total).astype(v.dtype), v)
        return out, (m + jnp.log(total))[..., 0]

    t = q_scaled.shape[2]
    if t <= block:
        return attend(q_scaled)
    out, lse = jax.lax.map(attend, _query_blocks(q_scaled, block))
    return _join_blocks(out, t), _join_blocks(lse, t)


def _attention_fwd(q, k, v, scale, block):
    out, lse = _attention_forward(_scaled_queries(q, scale), _heads_first(k), _heads_first(v), block)
    return _heads_first(out), (q, k, v, out, lse)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, scale, block):
    return _attention_fwd(q, k, v, scale, block)[0]  # the unused log-sum-exp is dead code to XLA


def _attention_bwd(scale, block, residuals, d_out):
    q, k, v, out, lse = residuals
    dtype = q.dtype
    qs, kh, vh, d_out = _scaled_queries(q, scale), _heads_first(k), _heads_first(v), _heads_first(d_out)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # rowsum(dO ∘ O) = rowsum(P ∘ dP)

    def grads(qs, d_out, lse, delta):  # one block of queries -> its dQ and its share of dKᵀ, dVᵀ (fp32)
        # dKᵀ, dVᵀ contract over queries with the small (D, Tq) operand transposed, so no (Tq, S) array is read
        # transposed (XLA:CPU runs that as a slow generic dot).
        p = jnp.exp(_scores(qs, kh) - lse[..., None])
        dv_t = jnp.einsum("bhdq,bhqk->bhdk", d_out.swapaxes(2, 3), p.astype(dtype),
                          preferred_element_type=jnp.float32)
        dp = jnp.einsum("bhqd,bhkd->bhqk", d_out, vh, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None])).astype(dtype)  # dL/d(scores)
        dq = jnp.einsum("bhqk,bhkd->bhqd", ds, kh, preferred_element_type=jnp.float32) * scale
        dk_t = jnp.einsum("bhdq,bhqk->bhdk", qs.swapaxes(2, 3), ds, preferred_element_type=jnp.float32)
        return dq, dk_t, dv_t

    t = q.shape[1]
    if t <= block:
        dq, dk_t, dv_t = grads(qs, d_out, lse, delta)
    else:
        def step(acc, xs):  # zero-padded queries have zero dO and delta, so they add nothing to dK, dV
            dq, dk_t, dv_t = grads(*xs)
            return (acc[0] + dk_t, acc[1] + dv_t), dq

        zeros = jnp.zeros(kh.swapaxes(2, 3).shape, jnp.float32)
        (dk_t, dv_t), dq = jax.lax.scan(step, (zeros, zeros), tuple(_query_blocks(x, block)
                                                                      for x in (qs, d_out, lse, delta)))
        dq = _join_blocks(dq, t)
    dk, dv = dk_t.swapaxes(2, 3), dv_t.swapaxes(2, 3)
    return tuple(_heads_first(g).astype(x.dtype) for g, x in ((dq, q), (dk, k), (dv, v)))


_attention.defvjp(_attention_fwd, _attention_bwd)


ATTENTIONS = ("einsum", "splash", "splash_interpret")


def attention(q, k, v, scale: float, kind: str = "einsum"):
    """softmax(q kᵀ · scale) v by the implementation `kind` asks for — the one place that decides.

    kind (a module's static `attention` field, set from the target by `targets.default_attention`): "einsum" is
    `dot_product_attention` (every CPU program and every test's default); "splash" the Pallas TPU kernel
    (`tpu_attention.splash_attention`) and "splash_interpret" the same kernel in the Pallas interpreter (non-TPU
    targets, tests), each only where `tpu_attention.splash_applies`: self-attention over >= 1024 tokens, a multiple
    of 128. Cross-attention's 77 keys and shorter or odd token counts take the einsum attention (the decisions and
    their figures: tpu_attention's module doc).
    """
    if kind not in ATTENTIONS:
        raise ConfigError(f"attention: {kind!r} is not one of {ATTENTIONS}")
    if kind != "einsum" and tpu_attention.splash_applies(q.shape[1], k.shape[1], q.shape[-1]):
        return tpu_attention.splash_attention(q, k, v, scale, interpret=kind == "splash_interpret")
    return dot_product_attention(q, k, v, scale)


class Attention(nn.Module):
    """diffusers `Attention` with `AttnProcessor2_0` (no masks), on (B, T, C) or NHWC input.

    to_q/to_k/to_v (bias = `bias`), to_out_0 (always biased, back to the input width). With `norm_num_groups` it
    also owns the `group_norm` applied before the projections (the VAE mid-block form), and with
    `residual_connection` adds the input back; the result is divided by `rescale_output_factor`.
    `upcast` computes the attention itself in fp32 (diffusers' classic processor does so for `upcast_attention`;
    its default SDPA processor ignores the flag). A no-op in fp32. `attention`: the implementation (`attention()`).
    """

    heads: int
    dim_head: int
    bias: bool = False
    norm_num_groups: int | None = None
    eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    upcast: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, context=None):
        residual = x
        if self.norm_num_groups is not None:
            x = GroupNorm(self.norm_num_groups, self.eps, dtype=self.dtype, name="group_norm")(x)
        spatial = x.shape
        if x.ndim == 4:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        context = x if context is None else context.astype(self.dtype)
        inner = self.heads * self.dim_head

        def heads(name, y):
            y = dense(inner, name=name, use_bias=self.bias, dtype=self.dtype)(y)
            return y.reshape(*y.shape[:2], self.heads, self.dim_head)

        q, k, v = heads("to_q", x), heads("to_k", context), heads("to_v", context)
        if self.upcast:
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        out = attention(q, k, v, self.dim_head**-0.5, self.attention)
        out = out.reshape(*out.shape[:2], inner).astype(self.dtype)
        out = dense(spatial[-1], name="to_out_0", dtype=self.dtype)(out)
        out = out.reshape(spatial)
        if self.residual_connection:
            out = out + residual.astype(out.dtype)
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


class GEGLU(nn.Module):
    """diffusers `GEGLU`: proj to 2*inner, split (hidden, gate), hidden * gelu(gate) with the exact erf GELU."""

    inner_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        # Batch layout pinned before the split: feature-sharded by the FSDP-sharded kernel, the split halves had to
        # be resharded with all-to-alls in the forward and backward passes (see TimestepEmbedding).
        h, gate = jnp.split(batch_sharded(dense(2 * self.inner_dim, name="proj", dtype=self.dtype)(x)), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="geglu", mult=4)`: net_0 (GEGLU), net_1 (dropout), net_2 (Linear)."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return dense(dim, name="net_2", dtype=self.dtype)(h)


class BasicTransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock` (norm_type="layer_norm", geglu): self-attn, cross-attn, feed-forward."""

    heads: int
    dim_head: int
    upcast_attention: bool = False
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, context):
        def attn(name):
            return Attention(self.heads, self.dim_head, upcast=self.upcast_attention, dtype=self.dtype,
                             attention=self.attention, name=name)

        def norm(name):
            return layer_norm(self.norm_eps, name=name, dtype=self.dtype)

        x = attn("attn1")(norm("norm1")(x)) + x
        x = attn("attn2")(norm("norm2")(x), context) + x
        return FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x)) + x


class Transformer2DModel(nn.Module):
    """diffusers `Transformer2DModel` on continuous NHWC input.

    GroupNorm (eps 1e-6) -> proj_in (1x1 conv, or Linear with `use_linear_projection`) -> transformer blocks ->
    proj_out -> + input. Inner width is heads * dim_head.
    """

    heads: int
    dim_head: int
    norm_num_groups: int
    use_linear_projection: bool = False
    num_layers: int = 1
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        y = GroupNorm(self.norm_num_groups, 1e-6, dtype=self.dtype, name="norm")(x)
        if self.use_linear_projection:
            y = dense(inner, name="proj_in", dtype=self.dtype)(y.reshape(b, h * w, c))
        else:
            y = conv(inner, 1, name="proj_in", dtype=self.dtype)(y).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            y = BasicTransformerBlock(self.heads, self.dim_head, self.upcast_attention, dtype=self.dtype,
                                      attention=self.attention, name=f"transformer_blocks_{i}")(y, context)
        if self.use_linear_projection:
            y = dense(c, name="proj_out", dtype=self.dtype)(y).reshape(b, h, w, c)
        else:
            y = conv(c, 1, name="proj_out", dtype=self.dtype)(y.reshape(b, h, w, inner))
        return batch_sharded(y + x.astype(y.dtype))


class UNetMidBlock2D(nn.Module):
    """diffusers `UNetMidBlock2D` (resnet_time_scale_shift="default"): resnet, then (attention, resnet) x num_layers.

    The VAE uses it with one single-head attention (`attention_head_dim` = channels) and no temb; the UNet's
    `mid_block_type="UNetMidBlock2D"` uses num_layers=0 (a single resnet).
    """

    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_act_fn: str = "silu"
    resnet_groups: int = 32
    output_scale_factor: float = 1.0
    add_attention: bool = True
    attention_head_dim: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        c = x.shape[-1]

        def resnet(i):
            return ResnetBlock2D(c, self.resnet_groups, self.resnet_eps, self.resnet_act_fn, self.output_scale_factor,
                                 dtype=self.dtype, name=f"resnets_{i}")

        x = resnet(0)(x, temb)
        head_dim = self.attention_head_dim or c
        for i in range(self.num_layers):
            if self.add_attention:
                x = Attention(c // head_dim, head_dim, bias=True, norm_num_groups=self.resnet_groups,
                              eps=self.resnet_eps, residual_connection=True,
                              rescale_output_factor=self.output_scale_factor, dtype=self.dtype,
                              name=f"attentions_{i}")(x)
            x = resnet(i + 1)(x, temb)
        return x
