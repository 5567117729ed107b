"""Steps/s of the synth_tiny training stages on this machine (the configuration `python train.py` runs).

  python benchmarks/train_tiny_cpu.py [--steps 20]
Random weights, synthetic in-memory batches of the config's shape (no data pipeline): the compiled step alone.
Last line: unet_steps_per_s=<value>.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from x2x_jax.configs import synth_tiny  # noqa: E402
from x2x_jax.diffusion.ddim import scheduler_config  # noqa: E402
from x2x_jax.diffusion.schedule import noise_schedule  # noqa: E402
from x2x_jax.models.clip_text import clip_text_from_config  # noqa: E402
from x2x_jax.models.unet import unet_from_config  # noqa: E402
from x2x_jax.models.vae import vae_from_config  # noqa: E402
from x2x_jax.training.run import stage_config  # noqa: E402
from x2x_jax.training.state import init_train_state, make_optimizer  # noqa: E402
from x2x_jax.training.stages.unet import IP2PObjective  # noqa: E402
from x2x_jax.training.stages.vae import VAEObjective  # noqa: E402
from x2x_jax.training.step import make_train_step  # noqa: E402


def time_stage(c, objective, params, frozen, steps):
    opt = make_optimizer(c.train.learning_rate)
    state = init_train_state(jax.tree.map(jnp.copy, params), opt, 0)  # the step donates the state
    step = jax.jit(make_train_step(objective, opt, c.train.ema_decay), donate_argnums=(0,))
    b, r = c.train.per_device_batch, c.data.resolution
    rng = np.random.default_rng(0)
    batch = {"past": rng.uniform(-1, 1, (1, b, r, r)).astype(np.float32),
             "current": rng.uniform(-1, 1, (1, b, r, r)).astype(np.float32),
             "input_ids": rng.integers(0, 49407, (1, b, 77)).astype(np.int32)}
    state, m = step(state, frozen, batch)
    float(m["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, frozen, batch)
        float(m["loss"])
    return steps / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    base = synth_tiny.get_config()
    k = jax.random.key(0)
    cv, cu = stage_config(base, "vae"), stage_config(base, "unet")
    vae = vae_from_config(dict(base.model.vae))
    unet = unet_from_config(dict(base.model.unet))
    text = clip_text_from_config(dict(base.model.text_encoder))
    r = base.data.resolution
    vp = vae.init(k, jnp.zeros((1, r, r, 1)))["params"]
    tp = text.init(k, jnp.zeros((1, 77), jnp.int32))["params"]
    up = unet.init(k, jnp.zeros((1, r // 4, r // 4, 8)), jnp.zeros((1,)), jnp.zeros((1, 77, 32)))["params"]
    vae_sps = time_stage(cv, VAEObjective(vae), vp, {}, a.steps)
    obj = IP2PObjective(unet, vae, text, noise_schedule(scheduler_config()), jnp.zeros((77,), jnp.int32))
    unet_sps = time_stage(cu, obj, up, {"vae": vp, "text_encoder": tp}, a.steps)
    total_min = (cv.train.steps / vae_sps + cu.train.steps / unet_sps) / 60
    print(f"backend={jax.default_backend()} cores={os.cpu_count()}")
    print(f"vae_stage: batch={cv.train.per_device_batch} pairs steps_per_s={vae_sps:.2f} "
          f"({cv.train.steps} steps)")
    print(f"unet_stage: batch={cu.train.per_device_batch} steps_per_s={unet_sps:.2f} ({cu.train.steps} steps)")
    print(f"estimated_train_minutes_without_data={total_min:.1f}")
    print(f"unet_steps_per_s={unet_sps:.2f}")


if __name__ == "__main__":
    main()
