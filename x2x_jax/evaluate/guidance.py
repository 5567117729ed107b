"""Learned vs relevance guidance against the true change masks of a synthetic split.

    python -m x2x_jax.evaluate.guidance measure --data-dir runs/synth_tiny/data [--n 64 --seeds 4 --tau 0.1]

Per image and seed: IoU of G >= tau with the true change mask, the pixel AUROC of G, and how much G moves between
seeds; the anatomical prior alone (M_pseudo) is the baseline both maps refine. The learned predictor is trained by
`python train.py --config.stage=guidance` (x2x_jax/training/stages/guidance.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from x2x_jax.convert.guidance import load_guidance
from x2x_jax.data.instructions import parse
from x2x_jax.data.pipeline import Augmentation, augment_example, open_source
from x2x_jax.editing.api import DEFAULT_MODEL, load_edit_model, resolve_model_dir
from x2x_jax.editing.priors import prior_for_instruction
from x2x_jax.editing.rse import encode_inputs, guidance_map, pool_to_latent, upsample_nearest
from x2x_jax.errors import ConfigError, cli_main
from x2x_jax.evaluate import metrics
from x2x_jax.models.tokenizer import tokenize
from x2x_jax.models.vae import latent_factor

TAU_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95: where each map's IoU peaks


def instruction_op(text: str) -> str:
    """"add" | "remove" | "change" when every edit of the instruction is that operation, else "mixed"."""
    ops = {e.op for e in parse(text).edits}
    return ops.pop() if len(ops) == 1 else "mixed"


def measure(model_dir, guidance_dir=None, *, data_dir: str, dataset: str = "synth_cxr_edit/v1", split: str = "val",
            n: int = 64, seeds=(0, 1, 2, 3), tau: float = 0.1, noise_level: float = 0.8, batch: int = 32) -> dict:
    """Learned vs relevance guidance G against the true change masks of the first `n` examples of a split.

    Per image and seed: IoU of (G upsampled to pixels as the edit does) >= tau, and the pixel AUROC of G; then the
    mean over images of the seed mean, the mean over images of the variance over seeds, and the mean pairwise
    IoU between seeds' masks (`seed_stability`). "prior" is G with the map set to 1 (M_pseudo alone), the
    baseline both maps refine. Relevance: K = 1 draw, the paper's map. Also per map: the IoU by operation
    (`iou_by_op`: an "add" must guess where a finding will appear, a "remove" or "change" can see it) and the
    best single threshold over TAU_GRID (`best_iou`, `best_tau`), which says whether tau, not the map, limits IoU.
    """
    model, params, tokenizer = load_edit_model(model_dir)
    gdir = Path(guidance_dir) if guidance_dir else resolve_model_dir(model_dir) / "guidance"
    predictor, params["guidance"] = load_guidance(gdir)
    model = dataclasses.replace(model, guidance=predictor)
    f = latent_factor(model.vae)
    source = open_source(dataset, split, data_dir)
    rng = np.random.default_rng(0)
    ex = [augment_example(source[i], rng, Augmentation(0.0, 0.0), with_mask=True) for i in range(min(n, len(source)))]
    images = np.stack([e["past"] for e in ex])
    masks = np.stack([e["mask"] for e in ex]) > 0.5
    texts = [e["instruction"] for e in ex]
    ops = np.array([instruction_op(t) for t in texts])
    r = images.shape[-1]
    priors = np.stack([prior_for_instruction(t, r, r)[0] for t in texts])
    ids = np.asarray(tokenize(tokenizer, texts)[0], np.int32)
    empty = np.asarray(tokenize(tokenizer, [""])[0][0], np.int32)

    @jax.jit
    def maps(params, images, ids, priors, seeds):
        enc = encode_inputs(model, params, images, ids, empty, seeds, 1)
        out = {}
        for kind in ("relevance", "learned"):
            _, g = guidance_map(model, params, enc, priors, jnp.float32(noise_level), guidance=kind)
            out[kind] = upsample_nearest(g, f)
        out["prior"] = upsample_nearest(pool_to_latent(priors, f), f)
        return out

    per_seed = {k: [] for k in ("relevance", "learned", "prior")}
    t0 = time.perf_counter()
    for s in seeds:
        chunks = []
        for i in range(0, len(ex), batch):
            sl = slice(i, i + batch)
            seed_arr = np.full(len(images[sl]), s, np.uint32) + np.arange(i, i + len(images[sl]), dtype=np.uint32)
            chunks.append(jax.device_get(maps(params, images[sl], ids[sl], priors[sl], seed_arr)))
        for k in per_seed:
            per_seed[k].append(np.concatenate([c[k] for c in chunks]))
    seconds = time.perf_counter() - t0
    result = {"n": len(ex), "seeds": list(seeds), "tau": tau, "split": split, "model": str(model_dir),
              "guidance_dir": str(gdir), "seconds": seconds}
    for k, g in per_seed.items():
        g = np.stack(g)  # (S, N, H, W)
        iou = metrics.thresholded_iou(g, masks[None], tau)  # (S, N)
        auroc = metrics.map_auroc(g, masks[None])
        result[k] = {"iou": metrics.summarize(np.nanmean(iou, 0))["mean"],
                     "auroc": metrics.summarize(np.nanmean(auroc, 0))["mean"],
                     "iou_seed_var": float(np.nanmean(np.nanvar(iou, 0))),
                     "iou_seed_std": float(np.nanmean(np.nanstd(iou, 0))),
                     "auroc_seed_var": float(np.nanmean(np.nanvar(auroc, 0))),
                     "map_seed_var": float(np.mean(np.var(g, 0))),
                     "seed_stability": metrics.summarize(metrics.seed_stability(g, tau))["mean"],
                     "mask_fraction": float(np.mean(g >= tau))}
        by_tau = [float(np.nanmean(metrics.thresholded_iou(g, masks[None], t))) for t in TAU_GRID]
        best = int(np.nanargmax(by_tau))
        result[k].update(best_iou=by_tau[best], best_tau=TAU_GRID[best],
                         iou_by_op={op: float(np.nanmean(iou[:, ops == op])) for op in sorted(set(ops))})
    result["true_mask_fraction"] = float(masks.mean())
    result["examples_by_op"] = {op: int(np.sum(ops == op)) for op in sorted(set(ops))}
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m x2x_jax.evaluate.guidance",
                                description="measure: learned vs relevance guidance against true change masks")
    p.add_argument("command", choices=("measure",))
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--guidance-model", default=None, help="default: MODEL/guidance")
    p.add_argument("--data-dir", required=True, help="TFDS data_dir holding the synthetic set")
    p.add_argument("--dataset", default="synth_cxr_edit/v1")
    p.add_argument("--split", default="val")
    p.add_argument("--num-examples", "--n", dest="n", type=int, default=64)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--tau", type=float, default=0.1)

    @cli_main
    def run():
        a = p.parse_args(argv)
        if a.seeds < 2 or a.n < 1:
            raise ConfigError(f"--seeds {a.seeds} must be >= 2 (seed stability compares seeds) and --n {a.n} >= 1")
        result = measure(a.model, a.guidance_model, data_dir=a.data_dir, dataset=a.dataset, split=a.split, n=a.n,
                         seeds=tuple(range(a.seeds)), tau=a.tau)
        print(json.dumps(result, indent=2))
        return 0

    return run()


if __name__ == "__main__":
    raise SystemExit(main())
