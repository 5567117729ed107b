"""FLOP counting from the jaxpr: known answers per primitive, every loop iteration, the train step's model FLOPs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from tests.training import tiny
from x2x_jax.flops import count_flops
from x2x_jax.training.step import model_flops


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_batched_matmul_is_2bmkn_as_xla_counts():
    a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 11))
    f = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)  # noqa: E731
    assert count_flops(f, a, b) == 2 * 3 * 5 * 7 * 11 == xla_flops(f, a, b)


@pytest.mark.parametrize("groups,stride", [(1, 1), (2, 2)])
def test_convolution_is_2_x_outputs_x_window_as_xla_counts(groups, stride):
    x, w = jnp.ones((2, 9, 9, 6)), jnp.ones((3, 3, 6 // groups, 10))

    def conv(x, w):  # VALID padding: XLA does not count multiplications by padding, we would
        return jax.lax.conv_general_dilated(x, w, (stride, stride), "VALID", feature_group_count=groups,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    out = (9 - 3) // stride + 1
    assert count_flops(conv, x, w) == 2 * 2 * out * out * 10 * 3 * 3 * (6 // groups) == xla_flops(conv, x, w)


def test_loops_count_every_iteration_xla_counts_one():
    x, w = jnp.ones((16, 8, 8)), jnp.ones((8, 8))
    mapped = lambda x, w: jax.lax.map(lambda a: a @ w, x)  # noqa: E731
    fori = lambda x, w: jax.lax.fori_loop(0, 5, lambda i, y: y @ w, x[0])  # noqa: E731
    assert count_flops(mapped, x, w) == 16 * 2 * 8**3
    assert xla_flops(mapped, x, w) < 2 * 2 * 8**3  # XLA: one body (+ the loop counter's adds)
    assert count_flops(fori, x, w) == 5 * 2 * 8**3


def test_cond_counts_the_costlier_branch_and_abstract_args_work():
    f = lambda p, x: jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x @ x, x)  # noqa: E731
    args = jax.ShapeDtypeStruct((), jnp.bool_), jax.ShapeDtypeStruct((4, 4), jnp.float32)
    assert count_flops(f, *args) == 2 * 2 * 4**3


def test_train_step_model_flops_are_encoders_plus_3x_unet_independent_of_remat_and_accumulation():
    obj = tiny.objective()
    p = jax.eval_shape(tiny.params)
    frozen = {"vae": p["vae"], "text_encoder": p["text_encoder"]}
    shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    one = model_flops(obj, p["unet"], frozen, shapes(tiny.batch(1, 4)))
    assert model_flops(obj, p["unet"], frozen, shapes(tiny.batch(2, 2))) == one

    micro = shapes(jax.tree.map(lambda x: x[0], tiny.batch(1, 4)))
    rand = jax.eval_shape(lambda k: jax.tree.map(lambda x: x[0], obj.draw(k, 1, 4, (tiny.RES, tiny.RES))),
                          jax.random.key(0))
    inputs = jax.eval_shape(obj.prepare, frozen, micro, rand)
    unet_forward = count_flops(obj.loss, p["unet"], inputs)
    assert unet_forward > 0
    assert one == count_flops(obj.prepare, frozen, micro, rand) + 3 * unet_forward

    unet, vae, text = tiny.models()
    rematted = dataclasses.replace(obj, unet=unet.clone(remat=True), vae=vae.clone(remat=True))
    assert model_flops(rematted, p["unet"], frozen, shapes(tiny.batch(1, 4))) == one
