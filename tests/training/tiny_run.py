"""A tiny end-to-end training run on a tiny TFDS synthetic build, as a script for the process-level tests.

  python -m tests.training.tiny_run WORKDIR DATA_DIR --steps 6 [--max-steps 3] [--fsdp 8] [--dump params.npz]
      [--coordinator 127.0.0.1:PORT --num-processes 2 --process-id I] [--compilation-cache DIR]
Device count comes from XLA_FLAGS set by the caller.
"""

import argparse
import sys

import numpy as np

RES = 32


GLOBAL_MICRO_BATCH = 8  # the same global batch whatever the device / process count


def tiny_config(steps: int, fsdp: int = 1):
    import jax

    from tests.training import tiny
    from x2x_jax.configs.common import base_config

    c = base_config()
    c.stage = "unet"
    c.data.resolution = RES
    c.data.worker_count = 0
    c.model.unet = dict(tiny.UNET)
    c.model.vae = dict(tiny.VAE)
    c.model.text_encoder = dict(tiny.TEXT, vocab_size=49408, max_position_embeddings=77, eos_token_id=49407,
                                bos_token_id=49406, pad_token_id=49407)
    c.train.steps = steps
    c.train.per_device_batch = GLOBAL_MICRO_BATCH // jax.device_count()
    c.train.accum_steps = 2
    c.train.learning_rate = 1e-4  # Adam at 1e-3 amplifies reduction-order noise past the 1e-5 comparisons
    c.train.compute_dtype = "float32"
    c.train.remat = "none"
    c.train.mesh_data = -1
    c.train.mesh_fsdp = fsdp
    c.log.every = 1
    c.log.checkpoint_every = 2
    return c


def build_data(data_dir: str):
    """A 48-example synthetic train split at 32 px (idempotent)."""
    from x2x_jax.data.tfds import SynthCxrEdit, SynthCxrEditConfig

    builder = SynthCxrEdit(config=SynthCxrEditConfig(name="tiny32", resolution=RES, split_sizes=(("train", 48),)),
                           data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder


def source(data_dir: str):
    """The tiny build's train split as a record source (what the stages read instead of the config's build)."""
    return build_data(data_dir).as_data_source(split="train")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("data_dir")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--dump")
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--compilation-cache", help="JAX's persistent compilation cache (every compile, however short)")
    a = p.parse_args(argv)

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    if a.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", a.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from x2x_jax.training import stages
    from x2x_jax.training.loop import train
    from x2x_jax.training.run import init_distributed

    init_distributed(a.coordinator, a.num_processes, a.process_id)
    config = tiny_config(a.steps, a.fsdp)
    summary = train(stages.for_config(config, source(a.data_dir)), config, a.workdir, max_steps=a.max_steps,
                    return_state=True)
    if a.dump:
        from jax.experimental import multihost_utils

        from x2x_jax.convert.params import flatten

        params = multihost_utils.process_allgather(summary["state"].params, tiled=True)
        if jax.process_index() == 0:
            np.savez(a.dump, **{"/".join(k): np.asarray(v) for k, v in flatten(params).items()})

if __name__ == "__main__":
    sys.exit(main())
