"""Throughput and MFU of the SD1.5-size InstructPix2Pix train step on one GPU (written for a single H100).

  python benchmarks/train_gpu.py [--per-device-batch 8] [--steps 10] [--resolution 512] [--peak-tflops 989]
  python benchmarks/train_gpu.py --tiny          # smoke mode: tiny models, runs on CPU in seconds

Random weights (no download), bf16 compute, fp32 params + AdamW + EMA, remat on, the same compiled step as
train.py (frozen VAE encode and CLIP text encode included in every step). FLOPs are the step's model FLOPs
(x2x_jax.training.step.model_flops: encoders' forward + 3x the UNet's forward, matmuls and convolutions counted
from the jaxpr, remat's recomputation excluded); MFU = achieved FLOP/s / peak (989 TFLOP/s dense bf16, H100 SXM).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from x2x_jax.configs import ix2x_v1  # noqa: E402
from x2x_jax.diffusion.ddim import scheduler_config  # noqa: E402
from x2x_jax.diffusion.schedule import noise_schedule  # noqa: E402
from x2x_jax.models.clip_text import clip_text_from_config  # noqa: E402
from x2x_jax.models.unet import unet_from_config  # noqa: E402
from x2x_jax.models.vae import vae_from_config  # noqa: E402
from x2x_jax.training.loop import compile_step  # noqa: E402
from x2x_jax.training.sharding import make_mesh  # noqa: E402
from x2x_jax.training.state import init_train_state, make_optimizer  # noqa: E402
from x2x_jax.training.stages.unet import IP2PObjective  # noqa: E402


def tiny(c):
    from tests.training import tiny as t

    c.model.unet, c.model.vae = dict(t.UNET), dict(t.VAE, in_channels=3, out_channels=3)
    c.model.text_encoder = dict(t.TEXT, max_position_embeddings=77)
    c.data.resolution = 32
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-device-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()

    c = ix2x_v1.get_config()
    c.data.resolution = a.resolution
    if a.tiny:
        c = tiny(c)
    c.train.per_device_batch, c.train.accum_steps, c.train.remat = a.per_device_batch, 1, ("none" if a.no_remat else "full")
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    unet = unet_from_config(dict(c.model.unet), dtype=dtype, remat=c.train.remat)
    vae = vae_from_config(dict(c.model.vae), dtype=dtype, remat=c.train.remat)
    text = clip_text_from_config(dict(c.model.text_encoder), dtype=dtype)
    r, f = c.data.resolution, 2 ** (len(vae.block_out_channels) - 1)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = jax.jit(lambda: unet.init(k1, jnp.zeros((1, r // f, r // f, unet.in_channels)), jnp.zeros((1,)),
                                       jnp.zeros((1, 77, unet.cross_attention_dim)))["params"])()
    frozen = {"vae": jax.jit(lambda: vae.init(k2, jnp.zeros((1, r, r, vae.in_channels)))["params"])(),
              "text_encoder": jax.jit(lambda: text.init(k3, jnp.zeros((1, 77), jnp.int32))["params"])()}
    mesh = make_mesh(-1, 1)
    optimizer = make_optimizer(1e-4)
    init = jax.jit(lambda p: init_train_state(p, optimizer, 0))
    state = init(params)
    del params
    objective = IP2PObjective(unet, vae, text, noise_schedule(scheduler_config()), jnp.zeros((77,), jnp.int32))
    batch_size = a.per_device_batch * mesh.size
    t0 = time.perf_counter()
    image = jax.ShapeDtypeStruct((r, r), jnp.float32)
    example = {"past": image, "current": image, "input_ids": jax.ShapeDtypeStruct((77,), jnp.int32)}
    step = compile_step(c, mesh, objective, optimizer, jax.eval_shape(lambda s: s, state),
                        jax.eval_shape(lambda s: s, frozen), example, 1, batch_size)
    compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    batch = {"past": rng.uniform(-1, 1, (1, batch_size, r, r)).astype(np.float32),
             "current": rng.uniform(-1, 1, (1, batch_size, r, r)).astype(np.float32),
             "input_ids": rng.integers(0, 49407, (1, batch_size, 77)).astype(np.int32)}
    batch = jax.device_put(batch, step.batch_sharding)
    frozen = jax.device_put(frozen, step.frozen_shardings)
    for _ in range(2):  # warm-up
        state, m = step.fn(state, frozen, batch)
        float(m["loss"])
    t0 = time.perf_counter()
    for _ in range(a.steps):
        state, m = step.fn(state, frozen, batch)
    float(m["loss"])
    dt = (time.perf_counter() - t0) / a.steps
    img_s = batch_size / dt
    mfu = step.flops_per_step / dt / (a.peak_tflops * 1e12 * mesh.size)
    print(f"device={jax.devices()[0].device_kind} dtype={jnp.dtype(dtype).name} resolution={r} "
          f"batch={batch_size} remat={c.train.remat} compile_s={compile_s:.1f}")
    print(f"step_s={dt:.4f} flops_per_step={step.flops_per_step:.4g} peak_tflops={a.peak_tflops}")
    print(f"img_per_s={img_s:.2f}")
    print(f"mfu={mfu:.3f}")


if __name__ == "__main__":
    main()
