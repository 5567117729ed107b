"""Does a trained model follow instructions? Measured on the synthetic val split, where the true current image
and the true change region are known.

  python -m x2x_jax.evaluate.validate --model runs/synth_tiny/unet/export [--n 64 --steps 50]

For each (past, instruction, current) the model edits past with plain IP2P (tau = 0, so nothing is masked or
composited) and we compare mean absolute errors against the true current image:
  inside the change region:  |edited - current|  vs  |past - current|   (following = the first is smaller)
                             and vs |VAE(past) - current| (past through the VAE: the same blur, no edit)
  outside it:                |edited - past|                            (collateral change)
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from x2x_jax.data import synthetic
from x2x_jax.editing.api import load_edit_model
from x2x_jax.editing.rse import EditParams, compile_edit
from x2x_jax.models.tokenizer import tokenize
from x2x_jax.models.vae import to_vae_channels


def evaluate(model_dir: str, n: int = 64, steps: int = 50, seed: int = 0, batch: int = 16, split: str = "val",
             text_scale: float = EditParams.text_scale, image_scale: float = EditParams.image_scale) -> dict:
    model, params, tok = load_edit_model(model_dir)
    vae = model.vae
    size = vae.sample_size
    edit = compile_edit(model, steps)
    empty = jnp.asarray(tokenize(tok, [""])[0][0])
    inside_edit, inside_past, inside_recon, outside = [], [], [], []
    roundtrip = jax.jit(lambda p, x: vae.apply({"params": p}, vae.apply({"params": p}, x, method=vae.encode)[0],
                                               method=vae.decode))
    for start in range(0, n, batch):
        ex = [synthetic.generate_example(seed, i, size, split=split) for i in range(start, min(n, start + batch))]
        past = np.stack([e["past"] for e in ex]).astype(np.float32)
        current = np.stack([e["current"] for e in ex]).astype(np.float32)
        mask = np.stack([e["mask"] for e in ex])
        ids, _ = tokenize(tok, [e["instruction"] for e in ex])
        out = edit(params, past, ids, empty, np.ones_like(past), np.arange(start, start + len(ex), dtype=np.uint32),
                   EditParams(0.0, text_scale, image_scale).traced())
        edited = np.asarray(out["edited"])
        recon = np.asarray(roundtrip(params["vae"], to_vae_channels(jnp.asarray(past), vae.in_channels)))
        recon = np.clip(recon.mean(-1), -1, 1)
        for e, p, c, m, rc in zip(edited, past, current, mask, recon):
            if m.any():
                inside_recon.append(np.abs(rc - c)[m].mean())
                inside_edit.append(np.abs(e - c)[m].mean())
                inside_past.append(np.abs(p - c)[m].mean())
            if (~m).any():
                outside.append(np.abs(e - p)[~m].mean())
    inside_edit, inside_past, inside_recon = map(np.asarray, (inside_edit, inside_past, inside_recon))
    return {
        "examples": n, "steps": steps, "split": split,
        "changed_region_mae_edited_vs_current": float(inside_edit.mean()),
        "changed_region_mae_past_vs_current": float(inside_past.mean()),
        "changed_region_mae_vae_roundtrip_past_vs_current": float(inside_recon.mean()),
        "fraction_closer_to_current_than_past": float(np.mean(inside_edit < inside_past)),
        "fraction_closer_to_current_than_vae_roundtrip_past": float(np.mean(inside_edit < inside_recon)),
        "unchanged_region_mae_edited_vs_past": float(np.mean(outside)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-examples", "--n", dest="n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--split", default="val")
    a = ap.parse_args(argv)
    print(json.dumps(evaluate(a.model, a.n, a.steps, split=a.split), indent=2))


if __name__ == "__main__":
    main()
