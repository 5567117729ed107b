"""Per-device memory of the SD1.5-size InstructPix2Pix train step (512 px, 4 images/device, 8-device mesh).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train_memory.py [--fsdp 8] [--no-remat]
      [--latent-cache]

Compiles (ahead of time, no weights: every array is abstract) the same jitted, sharded, donated train step that
train.py runs — full UNet (859.5 M), frozen VAE and CLIP text encoder, AdamW state and EMA — on 8 simulated CPU
devices, and prints XLA's memory analysis per device. bf16 compute, fp32 params/optimizer/EMA (the TPU setting).
Target: <= 14 GiB per device, so the recipe fits a 16 GiB TPU v5e chip. Last line: per_device_gib=<value>.
"""

import argparse
import os
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import ix2x_v1  # noqa: E402
from x2x_jax.diffusion.ddim import scheduler_config  # noqa: E402
from x2x_jax.diffusion.schedule import noise_schedule  # noqa: E402
from x2x_jax.models.clip_text import clip_text_from_config  # noqa: E402
from x2x_jax.models.unet import unet_from_config  # noqa: E402
from x2x_jax.models.vae import vae_from_config  # noqa: E402
from x2x_jax.training.loop import compile_step  # noqa: E402
from x2x_jax.training.sharding import make_mesh  # noqa: E402
from x2x_jax.training.state import init_train_state, make_optimizer  # noqa: E402
from x2x_jax.training.step import IP2PObjective, kernels_in_compute_dtype  # noqa: E402

GIB = 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fsdp", type=int, default=8)
    ap.add_argument("--per-device-batch", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--param-sharding", default="fsdp", choices=("fsdp", "replicated"))
    ap.add_argument("--latent-cache", action="store_true", help="the step on latent-cache batches (no VAE encode)")
    a = ap.parse_args()

    c = ix2x_v1.get_config()
    c.train.per_device_batch = a.per_device_batch
    c.train.accum_steps = 1  # accumulation adds no live memory beyond the gradient accumulator (in the step)
    c.train.remat = "none" if a.no_remat else "full"
    c.train.param_sharding = a.param_sharding
    c.data.resolution = a.resolution
    c.data.latent_cache = "abstract" if a.latent_cache else ""  # only the batch layout matters here
    mesh = make_mesh(-1, a.fsdp)
    dtype = jnp.bfloat16
    unet = unet_from_config(dict(c.model.unet), dtype=dtype, remat=c.train.remat)
    vae = vae_from_config(dict(c.model.vae), dtype=dtype, remat=c.train.remat)
    text = clip_text_from_config(dict(c.model.text_encoder), dtype=dtype)
    f, r = 8, a.resolution
    key = jax.random.key(0)
    abstract_unet = jax.eval_shape(lambda: unet.init(key, jnp.zeros((1, r // f, r // f, 8)), jnp.zeros((1,)),
                                                     jnp.zeros((1, 77, 768)))["params"])
    abstract_frozen = jax.eval_shape(lambda: kernels_in_compute_dtype({  # as train.py stores them
        "vae": vae.init(key, jnp.zeros((1, 64, 64, 3)))["params"],
        "text_encoder": text.init(key, jnp.zeros((1, 77), jnp.int32))["params"],
    }, dtype))
    optimizer = make_optimizer(c.train.learning_rate, c.train.weight_decay)
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, optimizer, 0), abstract_unet)
    objective = IP2PObjective(unet, vae, text, noise_schedule(scheduler_config()), jnp.zeros((77,), jnp.int32))
    n_params = sum(x.size for x in jax.tree.leaves(abstract_unet))
    print(f"devices={mesh.size} mesh={dict(mesh.shape)} unet_params={n_params:,} remat={c.train.remat} "
          f"param_sharding={a.param_sharding} per_device_batch={a.per_device_batch} resolution={r} "
          f"latent_cache={a.latent_cache}", flush=True)
    t0 = time.perf_counter()
    step = compile_step(c, mesh, objective, optimizer, abstract_state, abstract_frozen, 1,
                        a.per_device_batch * mesh.size)
    m = step.memory
    print(f"compile_s={time.perf_counter() - t0:.1f}")
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes"):
        print(f"{name}={getattr(m, name) / GIB:.3f} GiB")
    print(f"model_flops_per_step={step.flops_per_step:.4g} "
          f"per_image={step.flops_per_step / (a.per_device_batch * mesh.size):.4g}")
    print(f"per_device_gib={total / GIB:.3f}")


if __name__ == "__main__":
    main()
