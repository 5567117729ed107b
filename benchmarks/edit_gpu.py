"""Seconds per edit on one GPU (written for a single H100): our compiled RSE program (bf16) vs diffusers'
InstructPix2Pix pipeline (fp16), SD1.5-size random weights, 512 px, 100 DDIM steps, batch 1 and 8.

  python benchmarks/edit_gpu.py [--steps 100] [--batches 1 8] [--peak-tflops 989] [--no-diffusers]
  python benchmarks/edit_gpu.py --tiny     # smoke mode: tiny models at 32 px, runs on CPU
Both sides build the same architecture from the same configs with random weights (no download). Ours is the
full RSE program (tau = 0.1: relevance pass + masked loop, one extra UNet call on 2B over plain IP2P); diffusers
runs plain IP2P. MFU = FLOPs / time / peak, FLOPs counted from the program's jaxpr (x2x_jax.flops: matmuls and
convolutions, every loop iteration; XLA's cost analysis counts a loop body once).
Prints one line per (side, batch): s_per_batch, s_per_edit, and for ours compile_s, flops and mfu.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def configs(tiny: bool):
    from x2x_jax.configs.common import clip_vit_l14_text, sd15_ip2p_unet, sd_vae

    if not tiny:
        return sd15_ip2p_unet(), sd_vae(), clip_vit_l14_text(), 512
    from tests.oracle import TINY_TEXT, TINY_UNET, TINY_VAE

    return dict(TINY_UNET), dict(TINY_VAE), dict(TINY_TEXT), 32


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    if a.tiny:
        a.steps, a.batches, a.repeats = min(a.steps, 3), [1], 1

    import jax
    import jax.numpy as jnp

    from x2x_jax.models.tokenizer import load_tokenizer, tokenize
    from x2x_jax.diffusion.ddim import scheduler_config
    from x2x_jax.diffusion.schedule import noise_schedule
    from x2x_jax.editing.rse import EditParams, EditModel, compile_edit
    from x2x_jax.flops import count_flops
    from x2x_jax.models.clip_text import clip_text_from_config
    from x2x_jax.models.unet import unet_from_config
    from x2x_jax.models.vae import vae_from_config

    ucfg, vcfg, tcfg, r = configs(a.tiny)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    unet, vae = unet_from_config(ucfg, dtype=dtype), vae_from_config(vcfg, dtype=dtype)
    text = clip_text_from_config(tcfg, dtype=dtype)
    k = jax.random.split(jax.random.key(0), 3)
    f = 2 ** (len(vae.block_out_channels) - 1)
    params = {
        "unet": jax.jit(lambda: unet.init(k[0], jnp.zeros((1, r // f, r // f, 8)), jnp.zeros((1,)),
                                          jnp.zeros((1, 77, unet.cross_attention_dim)))["params"])(),
        "vae": jax.jit(lambda: vae.init(k[1], jnp.zeros((1, r, r, vae.in_channels)))["params"])(),
        "text_encoder": jax.jit(lambda: text.init(k[2], jnp.zeros((1, 77), jnp.int32))["params"])(),
    }
    sched = scheduler_config()
    model = EditModel(unet, vae, text, noise_schedule(sched), sched)
    tok = load_tokenizer()
    empty = jnp.asarray(tokenize(tok, [""])[0][0])
    print(f"device={jax.devices()[0].device_kind} dtype={jnp.dtype(dtype).name} resolution={r} steps={a.steps}")
    edit = compile_edit(model, a.steps)
    for b in a.batches:
        images = np.random.default_rng(0).uniform(-1, 1, (b, r, r)).astype(np.float32)
        ids, _ = tokenize(tok, ["Add the finding of pleural effusion."] * b)
        args = (params, images, ids, empty, np.ones_like(images), np.arange(b, dtype=np.uint32),
                EditParams().traced())
        t0 = time.perf_counter()
        compiled = edit.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        flops = count_flops(edit, *args)
        jax.block_until_ready(compiled(*args))
        best = float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            best = min(best, time.perf_counter() - t0)
        mfu = flops / best / (a.peak_tflops * 1e12)
        print(f"ours batch={b} compile_s={compile_s:.1f} s_per_batch={best:.3f} s_per_edit={best / b:.3f} "
              f"flops={flops:.4g} mfu={mfu:.3f}")

    if a.no_diffusers or jax.default_backend() == "cpu" and not a.tiny:
        return
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInstructPix2PixPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = torch.float16 if dev == "cuda" else torch.float32
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=AutoencoderKL(**vcfg), text_encoder=CLIPTextModel(CLIPTextConfig(**tcfg)), tokenizer=tok,
        unet=UNet2DConditionModel(**ucfg), scheduler=DDIMScheduler.from_config(sched), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).to(dev, tdtype)
    pipe.set_progress_bar_config(disable=True)
    for b in a.batches:
        rgb = [np.random.default_rng(i).uniform(0, 1, (r, r, 3)).astype(np.float32) for i in range(b)]
        run = lambda: pipe(["Add the finding of pleural effusion."] * b, image=rgb,  # noqa: E731
                           num_inference_steps=a.steps, output_type="np")
        run()
        best = float("inf")
        for _ in range(a.repeats):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if dev == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        print(f"diffusers batch={b} dtype={tdtype} s_per_batch={best:.3f} s_per_edit={best / b:.3f}")


if __name__ == "__main__":
    main()
