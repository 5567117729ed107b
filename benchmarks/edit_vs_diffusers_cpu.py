"""Edits/s on this CPU: our compiled edit program vs diffusers' PyTorch InstructPix2Pix pipeline, same weights.

  python benchmarks/edit_vs_diffusers_cpu.py [--steps 100] [--resolution 64] [--repeats 3]
Tiny random models (UNet (32, 64), 3-channel VAE (32, 64), 2-layer CLIP) written as a diffusers directory by
diffusers itself and loaded by both sides. Like for like: plain IP2P (tau = 0: 3-way CFG DDIM loop + VAE
encode/decode) against the pipeline with DDIMScheduler, batch 1, fp32, compile time excluded for ours (reported
separately). RSE (relevance map + masked loop) is reported on its own line. Last line: speedup=<ours/theirs>.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import jax
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from tests.convert.test_diffusers_bridge import torch_models, write_torch_pipeline
    from x2x_jax.convert.tokenizer import load_tokenizer, tokenize
    from x2x_jax.editing.api import Editor
    from x2x_jax.editing.rse import compile_edit

    torch.set_num_threads(os.cpu_count())
    text, r = "Add the finding of pleural effusion.", a.resolution
    with tempfile.TemporaryDirectory() as d:
        model_dir = write_torch_pipeline(os.path.join(d, "ip2p"), torch_models(seed=0), load_tokenizer())
        editor = Editor(model_dir)
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).uniform(-1, 1, (1, r, r)).astype(np.float32)
    ids, _ = tokenize(editor.tokenizer, [text])
    edit = compile_edit(editor.model, a.steps)

    def ours(tau):
        out = edit(editor.params, image, ids, editor.empty_ids, np.ones_like(image), np.uint32([0]),
                   np.float32(tau), np.float32(7.5), np.float32(1.5), np.float32(0.8), np.bool_(False))
        jax.block_until_ready(out)

    t0 = time.perf_counter()
    ours(0.0)
    compile_s = time.perf_counter() - t0

    def timed(fn):
        best = float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    rgb = np.repeat(((image[0] + 1) / 2)[..., None], 3, axis=-1)

    def theirs():
        with torch.no_grad():
            pipe(text, image=rgb, num_inference_steps=a.steps, guidance_scale=7.5, image_guidance_scale=1.5,
                 output_type="np", generator=torch.Generator().manual_seed(0))

    theirs()  # warm-up
    t_ours, t_theirs = timed(lambda: ours(0.0)), timed(theirs)
    t_rse = timed(lambda: ours(0.1))
    print(f"resolution={r} steps={a.steps} batch=1 cores={os.cpu_count()} (best of {a.repeats})")
    print(f"ours_compile_s={compile_s:.2f}")
    print(f"ours_plain_ip2p_s_per_edit={t_ours:.3f} edits_per_s={1 / t_ours:.2f}")
    print(f"diffusers_s_per_edit={t_theirs:.3f} edits_per_s={1 / t_theirs:.2f}")
    print(f"ours_rse_s_per_edit={t_rse:.3f}")
    print(f"speedup={t_theirs / t_ours:.2f}")


if __name__ == "__main__":
    main()
