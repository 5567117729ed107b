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

from x2x_jax.configs import ix2x_v1  # noqa: E402
from x2x_jax.training import stages  # noqa: E402
from x2x_jax.training.loop import compile_step, optimizer_for  # noqa: E402
from x2x_jax.training.sharding import make_mesh  # noqa: E402
from x2x_jax.training.state import init_train_state  # noqa: E402

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
    c.train.compute_dtype = "bfloat16"
    built = stages.for_config(c).build(c, mesh, abstract=True)  # the step train.py would compile, as shapes
    optimizer = optimizer_for(c)
    abstract_unet = built.trainable
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, optimizer, 0), abstract_unet)
    n_params, r = sum(x.size for x in jax.tree.leaves(abstract_unet)), a.resolution
    print(f"devices={mesh.size} mesh={dict(mesh.shape)} unet_params={n_params:,} remat={c.train.remat} "
          f"param_sharding={a.param_sharding} per_device_batch={a.per_device_batch} resolution={r} "
          f"latent_cache={a.latent_cache}", flush=True)
    t0 = time.perf_counter()
    step = compile_step(c, mesh, built.objective, optimizer, abstract_state, built.frozen, built.example, 1,
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
