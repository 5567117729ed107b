import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.training import tiny
from x2x_jax.training.sharding import batch_sharding, make_mesh, replicated, state_shardings
from x2x_jax.training.state import ema_decay_at, init_train_state, make_optimizer
from x2x_jax.training.step import GatherOnce, make_train_step


def run_steps(mesh, batches, mode="fsdp", min_size=2**14, lr=1e-5, gather_once=False):
    """`len(batches)` AdamW steps. (Adam's first steps are ~sign(g) * lr, so reduction-order noise in gradients that
    are zero in exact arithmetic — a conv bias followed by a GroupNorm — moves those params by up to ~lr per step: at
    the paper's 1e-4 the suite's tiny UNet differs by up to 5e-5 after 3 steps; the 1e-5 bound needs lr = 1e-5.)"""
    obj = tiny.objective()
    opt = make_optimizer(lr)
    p = tiny.params()
    frozen = {"vae": p["vae"], "text_encoder": p["text_encoder"]}
    init = lambda u: init_train_state(u, opt, seed=3)  # noqa: E731
    abstract = jax.eval_shape(init, p["unet"])
    st_sh = state_shardings(abstract, mesh, mode, min_size=min_size)
    state = jax.jit(init, out_shardings=st_sh)(p["unet"])
    gather = GatherOnce(mesh, st_sh.params, jnp.float32) if gather_once else None
    step = jax.jit(make_train_step(obj, opt, 0.999, gather_once=gather),
                   in_shardings=(st_sh, replicated(mesh), batch_sharding(mesh)),
                   out_shardings=(st_sh, replicated(mesh)), donate_argnums=(0,))
    losses = []
    for b in batches:
        state, m = step(state, jax.device_put(frozen, replicated(mesh)), jax.device_put(b, batch_sharding(mesh)))
        losses.append(float(m["loss"]))  # block on every step (rendezvous pitfall on 2 cores)
    return losses, jax.device_get(state), state


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


BATCHES = [tiny.batch(1, 8, seed=s) for s in range(3)]  # 3 steps of one micro-batch of 8


@pytest.fixture(scope="module")
def one_device():
    """The reference: BATCHES on one device (losses, final state), shared by the tests that compare against it."""
    l1, s1, _ = run_steps(make_mesh(1, 1, devices=jax.devices()[:1]), BATCHES, min_size=64)
    return l1, s1


@pytest.mark.slow
def test_sharded_step_equals_single_device_step(one_device):
    assert jax.device_count() == 8
    l1, s1 = one_device
    l8, s8, _ = run_steps(make_mesh(2, 4), BATCHES, min_size=64)
    np.testing.assert_allclose(l1, l8, rtol=0, atol=1e-5)
    assert max_diff(s1.params, s8.params) <= 1e-5
    assert max_diff(s1.ema_params, s8.ema_params) <= 1e-5


@pytest.mark.slow
def test_fsdp_shards_every_large_tensor():
    mesh = make_mesh(1, 8)
    _, _, state = run_steps(mesh, [tiny.batch(1, 8)], min_size=256)
    total = per_device = 0
    for leaf in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state) + jax.tree.leaves(state.ema_params):
        if not hasattr(leaf, "addressable_shards"):
            continue
        total += leaf.nbytes
        per_device += leaf.addressable_shards[0].data.nbytes
        if leaf.size >= 256:
            assert leaf.addressable_shards[0].data.size * 8 == leaf.size, leaf.shape
    assert per_device / total < 1 / 8 * 1.25  # small tensors (norms, biases) stay replicated


@pytest.mark.slow
def test_accumulating_four_micro_batches_equals_one_big_batch(one_device):
    lb, sb = one_device
    split = [jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[2:]), big) for big in BATCHES]
    la, sa, _ = run_steps(make_mesh(1, 1, devices=jax.devices()[:1]), split, min_size=64)
    assert abs(lb[0] - la[0]) <= 1e-6  # the same params: only the summation order differs
    np.testing.assert_allclose(lb, la, rtol=0, atol=1e-5)
    assert max_diff(sb.params, sa.params) <= 1e-5


@pytest.mark.slow
def test_gathering_the_params_once_per_step_equals_gathering_them_where_used():
    batches = [tiny.batch(2, 8, seed=s) for s in range(2)]  # accumulation 2 on a (2, 4) mesh
    lp, sp, _ = run_steps(make_mesh(2, 4), batches, min_size=64)
    lg, sg, _ = run_steps(make_mesh(2, 4), batches, min_size=64, gather_once=True)
    np.testing.assert_allclose(lp, lg, rtol=0, atol=1e-5)
    assert max_diff(sp.params, sg.params) <= 1e-5
    assert max_diff(sp.ema_params, sg.ema_params) <= 1e-5


def _all_gathers_in_and_outside_the_accumulation_loop(gather_once: bool) -> tuple[int, int]:
    """All-gathers in the compiled HLO of a scanned (accum 2) step over an 8-way FSDP mesh: (in the while body,
    elsewhere)."""
    mesh = make_mesh(1, 8)
    obj, opt, p = tiny.objective(), make_optimizer(1e-5), tiny.params()
    abstract = jax.eval_shape(lambda u: init_train_state(u, opt, seed=3), p["unet"])
    st_sh = state_shardings(abstract, mesh, "fsdp", min_size=64)
    gather = GatherOnce(mesh, st_sh.params, jnp.float32) if gather_once else None
    step = jax.jit(make_train_step(obj, opt, 0.999, unroll_accumulation=False, gather_once=gather),
                   in_shardings=(st_sh, replicated(mesh), batch_sharding(mesh)),
                   out_shardings=(st_sh, replicated(mesh)))
    frozen = {"vae": p["vae"], "text_encoder": p["text_encoder"]}
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tiny.batch(2, 8))
    text = step.lower(abstract, jax.eval_shape(lambda: frozen), batch).compile().as_text()
    bodies = set(re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", text))
    inside = outside = 0
    current = None
    for line in text.splitlines():
        head = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$", line)
        if head:
            current = head.group(1)
        elif re.search(r"\ball-gather(-start)?\(", line):
            inside += current in bodies
            outside += current not in bodies
    assert bodies, "no accumulation loop in the compiled step"
    return inside, outside


@pytest.mark.slow
def test_gather_once_takes_the_weight_all_gathers_out_of_the_accumulation_loop():
    plain_in, _ = _all_gathers_in_and_outside_the_accumulation_loop(gather_once=False)
    once_in, once_out = _all_gathers_in_and_outside_the_accumulation_loop(gather_once=True)
    assert plain_in > 0  # plain FSDP gathers the weights in every micro-step
    assert once_in == 0 and once_out > 0, (once_in, once_out)


def test_conditioning_dropout_rates():
    obj = tiny.objective(p=0.05)
    r = jax.random.uniform(jax.random.key(0), (400_000,))
    drop_text, drop_image = map(np.asarray, obj.conditioning_masks(r))
    text_only = np.mean(drop_text & ~drop_image)
    both = np.mean(drop_text & drop_image)
    image_only = np.mean(~drop_text & drop_image)
    for rate in (text_only, both, image_only):
        assert abs(rate - 0.05) < 0.002, (text_only, both, image_only)


def test_ema_warmup_follows_ldm():
    for n, want in ((1, 2 / 11), (10, 11 / 20), (10**6, 0.9999)):
        assert float(ema_decay_at(jnp.asarray(n), 0.9999)) == pytest.approx(want, rel=1e-6)


@pytest.mark.slow
def test_bf16_kernels_cast_before_apply_give_the_same_loss_and_grads():
    """The up-front kernel cast (so FSDP gathers bf16) must change nothing: Flax casts kernels at use anyway."""
    import dataclasses

    from x2x_jax.models.unet import unet_from_config
    from x2x_jax.models.layers import kernels_in_compute_dtype

    unet = unet_from_config(tiny.UNET, dtype=jnp.bfloat16)
    obj = dataclasses.replace(tiny.objective(), unet=unet)
    lat = (2, tiny.RES // 2, tiny.RES // 2)
    rng = np.random.default_rng(0)
    inputs = {"unet_input": jnp.asarray(rng.normal(size=(*lat, 8)), jnp.float32), "t": jnp.asarray([10, 900]),
              "context": jnp.asarray(rng.normal(size=(2, 8, tiny.TEXT["hidden_size"])), jnp.float32),
              "target": jnp.asarray(rng.normal(size=(*lat, 4)), jnp.float32)}
    params = jax.jit(unet.init)(jax.random.key(0), inputs["unet_input"], inputs["t"], inputs["context"])["params"]
    cast = kernels_in_compute_dtype(params, jnp.bfloat16)
    kinds = {(p[-1].key, x.dtype) for p, x in jax.tree_util.tree_leaves_with_path(cast)}
    assert ("kernel", jnp.dtype(jnp.bfloat16)) in kinds and ("kernel", jnp.dtype(jnp.float32)) not in kinds
    assert ("scale", jnp.dtype(jnp.float32)) in kinds and ("bias", jnp.dtype(jnp.float32)) in kinds

    def uncast_loss(p, inputs):
        pred = unet.apply({"params": p}, inputs["unet_input"], inputs["t"], inputs["context"])
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - inputs["target"]))

    loss, grads = jax.jit(jax.value_and_grad(obj.loss))(params, inputs)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(uncast_loss))(params, inputs)
    assert float(loss) == float(ref_loss)
    assert max_diff(grads, ref_grads) == 0.0
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
